"""How long a shared app keeps what visitors leave on it: `--keep-runs-days`.

Each visitor's runs (space.visitors) are deleted once nothing in them has changed for that long, unless
a training of theirs is queued or running; so are the jobs' logs and configs (they name the photos).
A private app keeps its runs in the runs folder itself, which this never touches. gradio's own cache (the copies of uploads,
samples and downloads it served) is emptied on the same schedule by app.py (`Blocks.delete_cache`).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from space.job_process import JOBS_DIR

log = logging.getLogger(__name__)
SHARED_KEEP_DAYS = 2.0
SWEEP_SECONDS = 3600.0


def last_change(folder: Path) -> float:
    """The newest modification time of `folder` and anything in it."""
    newest = folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            newest = max(newest, path.lstat().st_mtime)
        except OSError:  # removed meanwhile
            continue
    return newest


def expired(runs_dir: Path, days: float, busy: Iterable[Path], now: float | None = None) -> list[Path]:
    """The visitors' runs, and the jobs' files, untouched for `days`; never a run in `busy`."""
    now = time.time() if now is None else now
    cutoff, busy = now - days * 86400, {Path(p).resolve() for p in busy}
    found = []
    for visitor in sorted(Path(runs_dir).glob("visitor-*")):
        found += [run for run in sorted(visitor.iterdir()) if run.resolve() not in busy and last_change(run) < cutoff]
    jobs = Path(runs_dir) / JOBS_DIR
    if jobs.is_dir():
        found += [path for path in sorted(jobs.iterdir()) if path.lstat().st_mtime < cutoff]
    return found


def sweep(runs_dir: Path, days: float, busy: Iterable[Path], now: float | None = None) -> list[Path]:
    """Delete what `expired` finds (and visitors' folders left empty); what was deleted."""
    gone = expired(runs_dir, days, busy, now)
    for path in gone:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for visitor in Path(runs_dir).glob("visitor-*"):
        if visitor.is_dir() and not any(visitor.iterdir()):
            visitor.rmdir()
    if gone:
        log.info("Deleted %d runs and job files older than %g days", len(gone), days)
    return gone


def start(runs_dir: Path, days: float, busy: Callable[[], Iterable[Path]], every: float = SWEEP_SECONDS) -> None:
    """Sweep now and then every `every` seconds, in a daemon thread."""

    def loop() -> None:
        while True:
            try:
                sweep(runs_dir, days, busy())
            except OSError as err:  # a folder that vanished or cannot be read: next time
                log.warning("Retention sweep failed: %s", err)
            time.sleep(every)

    threading.Thread(target=loop, name="retention", daemon=True).start()
