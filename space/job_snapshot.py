"""What a page draws of a training job: a JobSnapshot, one immutable value per change.

The JobManager (space/jobs.py) replaces a job's snapshot whenever anything about it changes (its
state, a step, a sample, a score, where it was published); pages and API clients only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from space.run_scores import RunScores

JobState = Literal["idle", "queued", "starting", "running", "completed", "cancelled", "failed", "withdrawn"]


@dataclass(frozen=True)
class JobSnapshot:
    """Everything a page needs to draw a job; `version` changes whenever anything else does."""

    job_id: int = 0
    version: int = 0
    state: JobState = "idle"
    phase: str = ""
    message: str = ""
    step: int = 0
    total: int = 0
    eta_seconds: float | None = None
    losses: tuple[tuple[int, float], ...] = ()
    samples: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    run_dir: str | None = None
    error: str | None = None
    hub_url: str | None = None  # where the run was published when training finished
    publish_error: str | None = None  # why that failed; the run itself is fine
    queue_position: int | None = None  # 1: next to start; None once it is no longer queued
    starts_in_seconds: float | None = None  # a queued job's estimated wait; None: unknown
    resumable: bool = False  # failed or cancelled with a checkpoint: Resume continues it
    gpus: tuple[int, ...] = ()
    pid: int | None = None  # the training process (its process group), while it runs
    log_path: str | None = None
    scores: RunScores = field(default_factory=RunScores)  # of the base model and each checkpoint, when scored

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def queued(self) -> bool:
        return self.state == "queued"

    @property
    def pending(self) -> bool:
        """Queued or running: not finished yet."""
        return self.queued or self.active

    @property
    def publishing(self) -> bool:
        return self.active and self.phase == "publishing"

    @property
    def run_name(self) -> str | None:
        """The run's folder name: what pages and API clients call it (never its path on this server)."""
        return Path(self.run_dir).name if self.run_dir else None

    def shown(self, text: str | None) -> str | None:
        """`text` (a message, an error, a warning) with the run's folder said by its name."""
        if not text or not self.run_dir:
            return text
        return text.replace(self.run_dir + "/", "").replace(self.run_dir, self.run_name or "")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for API clients: runs and samples by name, no path on this server."""
        return {
            "job_id": self.job_id,
            "state": self.state,
            "phase": self.phase,
            "step": self.step,
            "total": self.total,
            "eta_seconds": self.eta_seconds,
            "queue_position": self.queue_position,
            "starts_in_seconds": self.starts_in_seconds,
            "resumable": self.resumable,
            "run": self.run_name,
            "error": self.shown(self.error),
            "message": self.shown(self.message),
            "hub_url": self.hub_url,
            "publish_error": self.shown(self.publish_error),
            "warnings": [self.shown(warning) for warning in self.warnings],
            "samples": [Path(sample).name for sample in self.samples],
            "losses": [list(point) for point in self.losses],
            "scores": [dict(row) for row in self.scores.rows],
            "pick": self.scores.pick,
            "pick_reason": self.scores.reason,
        }
