"""A run's checkpoint scores as the app keeps them: the rows of scores.jsonl by step (trainer/scores/measure.py
writes them), the pick over the checkpoints still on disk (trainer/scores/pick.py), and the step the run's
weights are from.

A running job gathers its rows from the training's ScoreEvents (space/jobs.py); a finished job, and any
run folder, reads them from the folder: both give the same RunScores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import checkpoints as ckpt
from trainer.run_folder import read_status
from trainer.scores.measure import read_scores
from trainer.scores.pick import pick_from_rows


@dataclass(frozen=True)
class RunScores:
    rows: tuple[Mapping[str, Any], ...] = ()  # one per step, oldest first; step 0 ("base": true) is the base model
    pick: int | None = None  # the checkpoint the pick rule keeps; None: none passes, or none scored yet
    reason: str = ""  # the pick rule's words for it

    def with_row(self, row: Mapping[str, Any], pick: int | None, reason: str) -> RunScores:
        """These scores with `row` (replacing an earlier row of its step: a resumed run rescored it) and the
        pick that came with it."""
        by_step = {int(r["step"]): r for r in (*self.rows, row)}
        return RunScores(tuple(by_step[step] for step in sorted(by_step)), pick, reason)

    @property
    def memorised(self) -> tuple[Mapping[str, Any], ...]:
        """The checkpoints' rows with a sample that is nearly a copy of a photo (the base model's aside)."""
        return tuple(row for row in self.rows if row.get("memorised") and not row.get("base"))


def run_scores(run_dir: Path) -> RunScores:
    """A run folder's scores and the pick among its checkpoints still on disk; empty when it was not scored."""
    rows = read_scores(Path(run_dir))
    if not rows:
        return RunScores()
    pick = pick_from_rows(rows, ckpt.checkpoint_steps(Path(run_dir)))
    return RunScores(tuple(rows), pick.step, pick.reason)


def weights_step(run_dir: Path) -> int | None:
    """The step the run's weights are from (run.json), when known."""
    step = read_status(Path(run_dir)).get("weights_step")
    return step if isinstance(step, int) else None

