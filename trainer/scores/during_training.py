"""Scores in the training process (trainer/scores/measure.py): the base model once before the first step, then
every checkpoint, each in its own "scoring" phase with its progress and its cost, into the run folder's
scores.jsonl; after each, the pick (trainer/scores/pick.py) among the checkpoints still on disk."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import trainer.toyworld.score  # noqa: F401  the toy world registers its judge as the toy model's embedders
from trainer import checkpoints as ckpt
from trainer.config import TrainConfig
from trainer.data.photos import load_rgb
from trainer.events import EventHandler, PhaseEvent, ProgressEvent, ScoreEvent
from trainer.families import Components
from trainer.output import evaluating, pipeline_from_parts
from trainer.run_folder import scored_image_path
from trainer.scores.measure import (
    Scorer,
    ScoresUnavailable,
    append_scores,
    base_reference,
    draw_batch,
    load_embedders,
    read_scores,
)
from trainer.scores.pick import Pick, pick_from_rows


@dataclass
class Scoring:
    scorer: Scorer
    run_dir: Path
    emit: EventHandler
    warn: Callable[[str], None]
    autocast: Callable[[], contextlib.AbstractContextManager]
    pick: Pick = field(default_factory=lambda: Pick(None, "no checkpoint scored yet"))
    last_seconds: float | None = None  # what the last scoring took (the ETA's cost of one)

    @classmethod
    def start(cls, config: TrainConfig, photos: Sequence[Path], run_dir: Path, device: torch.device,
              emit: EventHandler, warn: Callable[[str], None],
              autocast: Callable[[], contextlib.AbstractContextManager]) -> Scoring | None:
        """The scorer of this run, or None (scores off, or the embedders could not be loaded: said as a warning)."""
        if not config.score_checkpoints:
            return None
        emit(PhaseEvent("scoring", "Loading the scoring models"))
        try:
            embedders = load_embedders(config)
        except ScoresUnavailable as err:
            warn(f"Scores unavailable: {err}. Training goes on without scores or a best checkpoint.")
            return None
        rows = read_scores(run_dir)
        scorer = Scorer(embedders, [load_rgb(p) for p in photos], config, base=base_reference(rows),
                        batch=draw_batch(config, device.type))
        scoring = cls(scorer, run_dir, emit, warn, autocast)
        scoring.pick = pick_from_rows(rows, ckpt.checkpoint_steps(run_dir))
        return scoring

    @property
    def needs_base(self) -> bool:
        return self.scorer.base is None

    def score(self, parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
              step: int) -> dict:
        """Score the weights in memory as step `step` (0: the base model), append the row, update the pick."""
        what = "the base model" if step == 0 else f"step {step}"
        self.emit(PhaseEvent("scoring", f"Scoring {what}: {self.scorer.images_per_checkpoint} images "
                                        f"({self.scorer.embedders.label})"))
        pipe = pipeline_from_parts(parts, denoiser, text_encoders)
        cuda = [denoiser.device] if denoiser.device.type == "cuda" else []
        # The random state is left as it was: a run scored and one not scored train the same.
        with torch.random.fork_rng(devices=cuda), evaluating([denoiser, *text_encoders]):
            row = self.scorer.score(pipe, step, self.autocast,
                                    lambda done, total: self.emit(ProgressEvent("scoring", done, total)))
        append_scores(self.run_dir, row)
        if step:  # kept beside the scores: the app shows the picked step's, which its subject fidelity was read from
            for i, image in enumerate(self.scorer.subject_images):
                path = scored_image_path(self.run_dir, step, i)
                path.parent.mkdir(exist_ok=True)
                image.save(path)
        self.last_seconds = float(row["seconds"])
        self.pick = pick_from_rows(read_scores(self.run_dir), ckpt.checkpoint_steps(self.run_dir))
        self.emit(ScoreEvent(step, row, self.pick.step, self.pick.reason))
        if row["memorised"] and step:
            self.warn(f"Step {step}: a sample is {row['memorisation']:.2f} similar to one of your photos (copies "
                      f"start at {row['memorisation_threshold']:.2f}): the model may be reproducing the photos "
                      "instead of learning the subject. An earlier checkpoint, fewer steps or a lower learning "
                      "rate help.")
        self.emit(PhaseEvent("scoring", f"Scored {what} in {row['seconds']:.1f} s"))
        return row
