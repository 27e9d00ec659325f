"""Progress leaves the engine as typed events; cancellation comes in through a token."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Phase = Literal["loading", "class-images", "caching", "training", "saving", "done"]


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


Event = PhaseEvent | StepEvent | ProgressEvent | SampleEvent | CheckpointEvent | WarningEvent
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
