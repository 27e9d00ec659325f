"""Progress leaves the engine as typed events; cancellation comes in through a token.

The same events cross a process boundary as JSON lines (`python -m trainer train --events json`,
read back by the app's JobManager): `event_to_json` / `event_from_json` are that one vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Phase = Literal["loading", "class-images", "caching", "training", "scoring", "saving", "done"]


@dataclass(frozen=True)
class PhaseEvent:
    phase: Phase
    message: str = ""


@dataclass(frozen=True)
class StepEvent:
    step: int
    total: int
    loss: float
    lr: float
    eta_seconds: float | None


@dataclass(frozen=True)
class ProgressEvent:
    """Progress inside a phase other than training (class images generated, latents cached)."""

    phase: Phase
    done: int
    total: int


@dataclass(frozen=True)
class SampleEvent:
    step: int
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: Path


@dataclass(frozen=True)
class WarningEvent:
    message: str


@dataclass(frozen=True)
class ScoreEvent:
    """The scores of the base model (step 0) or of a checkpoint (trainer/scores/measure.py), and the pick so far."""

    step: int
    scores: dict[str, Any]  # one row of scores.jsonl
    pick: int | None  # the step the pick rule keeps now (trainer/scores/pick.py); None: none passes
    pick_reason: str


Event = PhaseEvent | StepEvent | ProgressEvent | SampleEvent | CheckpointEvent | WarningEvent | ScoreEvent
EventHandler = Callable[[Event], None]


class CancelToken:
    """Set from any thread; the training loop checks it once per step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class FileCancelToken(CancelToken):
    """Also cancelled once `path` exists: how another process (the app) asks a training to stop.

    One stat per read; the loop reads `cancelled` once per step, the class-image loop once per image.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def cancelled(self) -> bool:
        if not super().cancelled and self.path.exists():
            self.cancel()
        return super().cancelled


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    status: Literal["completed", "cancelled"]
    step: int
    total_steps: int
    checkpoint: Path | None
    weights: Path | None
    samples: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def cancelled(self) -> bool:
        return self.status == "cancelled"


# --- events as JSON lines -------------------------------------------------------------------
_TYPES: dict[str, type] = {
    "phase": PhaseEvent,
    "step": StepEvent,
    "progress": ProgressEvent,
    "sample": SampleEvent,
    "checkpoint": CheckpointEvent,
    "warning": WarningEvent,
    "score": ScoreEvent,
    "result": RunResult,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def event_to_json(event: Event | RunResult) -> str:
    """One line: {"type": "step", "step": 3, ...}, the dataclass's fields with paths as strings."""
    fields = {f.name: _plain(getattr(event, f.name)) for f in dataclasses.fields(event)}
    return json.dumps({"type": _NAMES[type(event)], **fields})


def _typed(tp: Any, value: Any) -> Any:
    """A JSON value back as the field's type: the paths (also inside tuples and optionals) and tuples."""
    if value is None:
        return None
    if tp is Path:
        return Path(value)
    if typing.get_origin(tp) is tuple:
        return tuple(_typed(typing.get_args(tp)[0], v) for v in value)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _typed(inner[0], value) if len(inner) == 1 else value
    return value


def event_from_json(line: str) -> Event | RunResult | dict[str, Any]:
    """The event (or RunResult) a line of `event_to_json` holds; any other record (the CLI's
    {"type": "error", ...}, or a type this version does not know) as the plain dict.
    Raises ValueError for a line that is not a JSON object."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError(f"not an event: {line[:80]!r}")
    cls = _TYPES.get(data.get("type"))
    if cls is None:
        return data
    hints = _hints(cls)
    return cls(**{name: _typed(hints[name], value) for name, value in data.items() if name in hints})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The dataclass's fields and their types (a field added in a newer version is left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
