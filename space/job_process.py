"""A training in its own process, started the way a user starts one from a shell:

    python -m trainer train --config <job>.json --events json --cancel-file <job>.cancel
    python -m accelerate.commands.launch --multi_gpu --num_processes N -m trainer train ...  (N GPUs)

The child prints one JSON line per engine event (trainer/events.py's vocabulary) on stdout, which
`TrainingProcess.run` feeds to the JobManager, and returns the RunResult. Its stderr is the job's log
(`<runs>/.jobs/<job>.log`). The app's Hub token never reaches the child: publishing stays in the app.

Cancel is a file the child checks each step: a clean stop that checkpoints and saves. A child still
running `grace_seconds` after that is killed, with its whole process group (it runs in a session of
its own, so accelerate's workers go with it). A child that dies raises ChildDied, with the last lines
of its log and what to try.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import trainer
from space import texts
from space.job_queue import Slot
from trainer.config import ConfigError, TrainConfig, UserError
from trainer.events import EventHandler, RunResult, event_from_json

log = logging.getLogger(__name__)

REPO_ROOT = Path(trainer.__file__).resolve().parent.parent  # the child imports this checkout's engine
LOG_TAIL_LINES = 20
# Set by a launcher for its workers; a stale one from the app's own environment would confuse the child.
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError|MemoryError|can't allocate memory", re.IGNORECASE)


class ChildDied(RuntimeError):
    """The training process ended without a result it could explain (killed, crashed)."""

    def __init__(self, message: str, returncode: int, forced: bool) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.forced = forced  # killed by us, after a cancel it did not honour in time


JOBS_DIR = ".jobs"  # in the runs folder: each training's config, log and cancel file


@dataclass(frozen=True)
class JobFiles:
    """A job's files in the app's own folder: the config the child reads, the cancel file, the log."""

    config: Path
    cancel: Path
    log: Path

    @classmethod
    def make(cls, folder: Path, name: str) -> JobFiles:
        folder.mkdir(parents=True, exist_ok=True)
        files = cls(folder / f"{name}.json", folder / f"{name}.cancel", folder / f"{name}.log")
        files.cancel.unlink(missing_ok=True)
        return files


def train_command(config: Path, cancel_file: Path, processes: int = 1, mixed_precision: str = "no") -> list[str]:
    """The child's argv: the CLI, or accelerate launch of it over `processes` GPUs. No user text is
    parsed by a shell, and no token is in it."""
    cli = ["-m", "trainer", "train", "--config", str(config), "--events", "json", "--cancel-file", str(cancel_file)]
    if processes <= 1:
        return [sys.executable, *cli]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    return [sys.executable, *launch, *cli]


def child_env(slot: Slot, base: dict[str, str] | None = None) -> dict[str, str]:
    """The app's environment, plus: this checkout on PYTHONPATH, unbuffered output, and the slot's
    GPUs as CUDA_VISIBLE_DEVICES (counted among the GPUs the app itself was given)."""
    env = dict(os.environ if base is None else base)
    for name in _DISTRIBUTED_ENV:
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if slot.gpus:
        visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[g] if g < len(visible) else str(g) for g in slot.gpus)
    return env


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log (each cut at 300 characters; a progress bar's carriage returns count as breaks)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 64_000))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line[:300] for line in re.split(r"[\r\n]+", text) if line.strip()]
    return "\n".join(kept[-lines:])


def died_message(returncode: int, tail: str, log_path: Path) -> str:
    """What happened, the log's last lines, and what to try."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = texts.died_by_signal(name)
    else:
        how = texts.died_with_status(returncode)
    advice = texts.DIED_OUT_OF_MEMORY if _OUT_OF_MEMORY.search(tail) else (
        texts.DIED_KILLED if returncode < 0 else texts.DIED_OTHER)
    return f"{how} Last lines of its log ({log_path}):\n\n```\n{tail or '(empty)'}\n```\n\n{advice}"


class TrainingProcess:
    """One job's child process. `run` blocks until it ends; `stop` and `kill` may come from any thread."""

    def __init__(self, files: JobFiles, slot: Slot, grace_seconds: float) -> None:
        self.files = files
        self.slot = slot
        self.grace_seconds = grace_seconds
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._stop_asked = False
        self._forced = False
        self._killer: threading.Timer | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid, which is also its process group's id."""
        return self._proc.pid if self._proc is not None else None

    def run(self, config: TrainConfig, on_event: EventHandler) -> RunResult:
        """Train `config` in the child. Raises ConfigError for input it refused (exit 2), UserError
        for a failure it explained (exit 1), ChildDied for anything else."""
        config.save(self.files.config)
        command = train_command(self.files.config, self.files.cancel, self.slot.processes, config.mixed_precision)
        result, error = None, None
        with self.files.log.open("w", encoding="utf-8") as log_file:
            log_file.write(f"$ {shlex.join(command)}\n")
            log_file.flush()
            with self._lock:
                self._proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file,
                    env=child_env(self.slot), start_new_session=True, text=True, encoding="utf-8",
                    errors="replace", bufsize=1,
                )
                if self._stop_asked:
                    self._arm_killer()
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                try:
                    record = event_from_json(line)
                except (ValueError, TypeError):  # not ours (a library printing to stdout): keep it in the server log
                    log.debug("training child: %s", line.rstrip())
                    continue
                if isinstance(record, RunResult):
                    result = record
                elif isinstance(record, dict):
                    error = record if record.get("type") == "error" else error
                else:
                    on_event(record)
            returncode = self._proc.wait()
        with self._lock:
            if self._killer is not None:
                self._killer.cancel()
        if returncode == 0 and result is not None:
            return result
        if error is not None and returncode in (1, 2) and not error.get("unexpected"):
            message = str(error.get("message", ""))
            raise ConfigError(message) if returncode == 2 else UserError(message)
        raise ChildDied(died_message(returncode, log_tail(self.files.log), self.files.log), returncode, self._forced)

    def stop(self) -> None:
        """Ask for a clean stop (the cancel file); kill the child if it has not ended within the grace time."""
        with self._lock:
            if self._stop_asked:
                return
            self._stop_asked = True
            self.files.cancel.touch()
            if self._proc is not None:
                self._arm_killer()

    def kill(self) -> None:
        """SIGKILL the child's whole process group (accelerate's workers too)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(self._proc.pid, signal.SIGKILL)

    def _arm_killer(self) -> None:
        self._killer = threading.Timer(self.grace_seconds, self._kill_after_grace)
        self._killer.daemon = True
        self._killer.start()

    def _kill_after_grace(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            log.warning("Training child %s did not stop within %.0f s of cancel; killing it.",
                        self._proc.pid, self.grace_seconds)
            self._forced = True
            self.kill()
