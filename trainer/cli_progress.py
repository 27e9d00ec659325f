"""The command line's view of a training: engine events in, terminal output out.

On a terminal: one tqdm bar per phase (training steps with loss, lr and ETA; class images; latent
caching), with phase lines, samples and warnings written above it. Into a pipe or a file (a log,
CI): plain lines, about one per tenth of a phase, so a long run leaves a short log. Quiet: nothing;
the errors and the final line are the caller's to print. For a program (`--events json`, the app):
`JsonEvents`, one JSON line per event, then one for the result or the error.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from tqdm import tqdm

from trainer.events import (
    CheckpointEvent,
    Event,
    PhaseEvent,
    ProgressEvent,
    RunResult,
    SampleEvent,
    ScoreEvent,
    StepEvent,
    WarningEvent,
    event_to_json,
)

LINES_PER_PHASE = 10  # a plain log shows about this many progress lines per phase, however long
_LABELS = {"training": "training", "class-images": "class images", "caching": "caching latents", "scoring": "scoring"}
_UNITS = {"training": "step", "class-images": "image", "caching": "image", "scoring": "prompt"}
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def format_eta(seconds: float | None) -> str:
    return "?" if seconds is None else tqdm.format_interval(seconds)


def plain_every(total: int) -> int:
    """Print every step of a short phase (up to LINES_PER_PHASE steps); about every tenth of a longer one."""
    return max(1, -(-total // LINES_PER_PHASE))


class CliProgress:
    """Call it with each event; close it (or use `with`) when the training returns or fails.

    `tty` chooses the bar (True) or the plain lines (False); None asks `file.isatty()`.
    """

    def __init__(
        self, file: TextIO | None = None, err: TextIO | None = None, *, quiet: bool = False, tty: bool | None = None
    ) -> None:
        self.file = file if file is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.quiet = quiet
        self.tty = self.file.isatty() if tty is None else tty
        self._bar: tqdm | None = None
        self._bar_phase: str | None = None

    def __enter__(self) -> CliProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if isinstance(event, StepEvent):
            self._step(event)
        elif isinstance(event, ProgressEvent):
            self._progress(event.phase, event.done, event.total)
        elif isinstance(event, PhaseEvent):
            if event.phase != self._bar_phase:
                self.close()
            self._line(f"[{event.phase}] {event.message}")
        elif isinstance(event, SampleEvent):
            self._line(f"samples at step {event.step}: {', '.join(str(p) for p in event.paths)}")
        elif isinstance(event, CheckpointEvent):
            self._line(f"checkpoint at step {event.step}: {event.path}")
        elif isinstance(event, WarningEvent):
            self._line(f"warning: {event.message}", self.err)
        elif isinstance(event, ScoreEvent):
            self._line(score_line(event))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._bar_phase = None, None

    # --- the two outputs ------------------------------------------------------------------
    def _line(self, text: str, file: TextIO | None = None) -> None:
        file = file or self.file
        if self.tty:
            tqdm.write(text, file=file)  # clears the bar, writes the line, redraws the bar below it
        else:
            print(text, file=file, flush=True)

    def _step(self, event: StepEvent) -> None:
        if self.tty:
            bar = self._bar_for("training", event.total)
            bar.set_postfix_str(f"loss={event.loss:.4f}, lr={event.lr:.2e}, eta={format_eta(event.eta_seconds)}",
                                refresh=False)
            bar.update(event.step - bar.n)  # a resumed run starts past 0
        elif event.step % plain_every(event.total) == 0 or event.step == event.total:
            self._line(f"step {event.step}/{event.total} loss {event.loss:.4f} lr {event.lr:.2e} "
                       f"eta {format_eta(event.eta_seconds)}")

    def _progress(self, phase: str, done: int, total: int) -> None:
        if self.tty:
            bar = self._bar_for(phase, total)
            bar.update(done - bar.n)
        elif done % plain_every(total) == 0 or done == total:
            self._line(f"[{phase}] {done}/{total}")

    def _bar_for(self, phase: str, total: int) -> tqdm:
        if self._bar is None or self._bar_phase != phase:
            self.close()
            self._bar = tqdm(total=total, desc=_LABELS.get(phase, phase), unit=_UNITS.get(phase, "it"),
                             file=self.file, bar_format=_BAR_FORMAT, dynamic_ncols=True, leave=True)
            self._bar_phase = phase
        return self._bar


def score_line(event: ScoreEvent) -> str:
    row = event.scores
    what = "the base model" if row.get("base") else f"step {event.step}"
    copy = " (a copy of a photo?)" if row.get("memorised") and not row.get("base") else ""
    best = "" if row.get("base") else (f"; best so far: step {event.pick}" if event.pick is not None
                                       else "; no checkpoint passes the pick rule yet")
    return (f"scores of {what}: subject {row['subject']:.3f}, prompt {row['prompt']:.3f}, drift {row['drift']:.0%}, "
            f"memorisation {row['memorisation']:.3f}{copy} ({row['seconds']:.1f} s){best}")


class JsonEvents:
    """`--events json`: each event as one line of `event_to_json` on `file`, flushed at once; then
    {"type": "result", ...} or {"type": "error", "message": ..., "exit": N}. `enabled=False` (a
    process other than RANK 0 under `accelerate launch`) prints nothing, so the reader sees one run."""

    def __init__(self, file: TextIO, *, enabled: bool = True) -> None:
        self.file = file
        self.enabled = enabled

    def __call__(self, event: Event | RunResult) -> None:
        if self.enabled:
            print(event_to_json(event), file=self.file, flush=True)

    def error(self, message: str, status: int, *, unexpected: bool = False) -> None:
        """`unexpected`: an exception that is no UserError (a bug, out of memory): its traceback is on stderr."""
        record = {"type": "error", "message": message, "exit": status} | ({"unexpected": True} if unexpected else {})
        if self.enabled:
            print(json.dumps(record), file=self.file, flush=True)
