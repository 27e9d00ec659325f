"""The Train tab's scores, under the loss plot: a chart of subject fidelity, prompt fidelity and class
drift over the steps (step 0 is the base model), the pick and why, any memorisation, and "Use this
checkpoint", which makes the picked checkpoint the run's weights (trainer/export.py) once the run has
stopped training. Hidden while the run is not scored.

The poll (space/train_tab.py) redraws the panel from the job's snapshot (space/run_scores.py); the button's
handler is `use_pick`, behind train_tab's `use_checkpoint`, which knows the visitor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gradio as gr
import pandas as pd

from space import texts
from space.errors import error_message
from space.job_snapshot import JobSnapshot
from space.jobs import JobManager, Visitor
from space.run_scores import RunScores, run_scores, weights_step
from trainer.config import UserError
from trainer.export import loses_current_weights

log = logging.getLogger(__name__)
# The chart's series: (the row's key in scores.jsonl, the name in the legend).
SERIES: tuple[tuple[str, str], ...] = (
    ("subject", "subject fidelity"),
    ("prompt", "prompt fidelity"),
    ("subject_in_context", "subject in new contexts"),
    ("drift", "class drift"),
)
COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#2ca02c")  # the series', then the pick's


@dataclass(frozen=True)
class ScoresPanel:
    """What the Train tab shows of a scored run, under the loss plot."""

    box: gr.Column
    plot: gr.LinePlot
    line: gr.Markdown
    use: gr.Button
    replace: gr.Checkbox
    result: gr.Markdown
    DRAWN: ClassVar[tuple[str, ...]] = ("box", "plot", "line", "use", "replace")  # what `draw` gives, in order

    @property
    def drawn(self) -> list[Any]:
        return [getattr(self, name) for name in self.DRAWN]


def scores_frame(rows: Iterable[Mapping[str, Any]], pick: int | None = None) -> pd.DataFrame:
    """The chart's long table: one row per step and series (step, value, score); the pick, when there is one,
    is a vertical line from 0 to 1 at its step (a series of its own)."""
    points = [
        (int(row["step"]), float(row[key]), name) for row in rows for key, name in SERIES if row.get(key) is not None
    ]
    if points:
        # The pick's series is there from the first point on, as a line of no length until there is a pick: the
        # chart's legend keeps the series of its first drawing, so one that appeared later would not show.
        at, top = (pick, 1.0) if pick is not None else (points[0][0], 0.0)
        points += [(at, 0.0, texts.PICKED_SERIES), (at, top, texts.PICKED_SERIES)]
    # Typed columns even when empty: the plot reads "quantitative" axes from the dtypes.
    return pd.DataFrame(
        {
            "step": pd.Series([p[0] for p in points], dtype="int64"),
            "value": pd.Series([p[1] for p in points], dtype="float64"),
            "score": pd.Series([p[2] for p in points], dtype="object"),
        }
    )


def summary(scores: RunScores, weights: int | None = None, running: bool = False) -> str:
    """The line under the chart: the pick and why (while training: the best so far), memorisation, the step the
    weights are from."""
    memorised = [
        (int(r["step"]), float(r["memorisation"]), float(r["memorisation_threshold"])) for r in scores.memorised
    ]
    return texts.scores_line(scores.pick, scores.reason, memorised, weights, running)


def draw(snap: JobSnapshot, mine: bool) -> tuple[Any, ...]:
    """The panel for `snap` (ScoresPanel.drawn's order); the button only for the job's owner, pressable
    once it has stopped training."""
    scores = snap.scores
    pending = snap.active or snap.queued
    weights = weights_step(Path(snap.run_dir)) if snap.run_dir and not pending else None
    return (
        gr.update(visible=bool(scores.rows)),
        gr.update(value=scores_frame(scores.rows, scores.pick), title=texts.scores_title(scores.pick, pending)),
        summary(scores, weights, pending),
        gr.update(visible=mine and scores.pick is not None, interactive=not pending),
        gr.update(visible=False, value=False),
    )


def layout() -> ScoresPanel:
    with gr.Column(visible=False) as box:
        plot = gr.LinePlot(
            scores_frame(()),
            x="step",
            y="value",
            color="score",
            # Every series named up front: the legend and colours stay put when the pick appears mid-run.
            color_map=dict(zip([name for _, name in SERIES] + [texts.PICKED_SERIES], COLORS, strict=True)),
            y_lim=[0, 1.05],
            title=texts.scores_title(None),
            height=220,
            elem_id="scores-plot",
        )
        line = gr.Markdown(elem_id="scores-line")
        with gr.Row():
            use = gr.Button(texts.USE_CHECKPOINT_BUTTON, scale=0, min_width=220, elem_id="use-checkpoint")
            replace = gr.Checkbox(False, label=texts.REPLACE_WEIGHTS_LABEL, visible=False, elem_id="replace-weights")
        result = gr.Markdown(elem_id="use-checkpoint-result")
    return ScoresPanel(box, plot, line, use, replace, result)


# --- "Use this checkpoint" --------------------------------------------------------------------
class Refused(UserError):
    """Why the pick cannot be made the run's weights now."""


def use_pick(jobs: JobManager, who: Visitor | None, replace: bool) -> tuple[Any, ...]:
    """Make the pick of `who`'s job the run's weights: (the line under the chart, the result, the confirm
    box). A refusal is a warning and the result line; when the weights the run has now would be lost, the
    confirm box appears and a second press with it ticked replaces them."""
    try:
        run_dir, scores, step = _exportable(jobs, who)
        if weights_step(run_dir) == step:
            return gr.skip(), texts.ALREADY_THE_WEIGHTS.format(step=step), gr.skip()
        if not replace and loses_current_weights(run_dir, step):
            message = texts.would_lose_weights(weights_step(run_dir), step)
            gr.Warning(message)
            return gr.skip(), message, gr.update(visible=True, value=False)
        done = _export(run_dir, step, replace)
    except Refused as err:
        gr.Warning(str(err))
        return gr.skip(), str(err), gr.skip()
    return summary(scores, done), texts.EXPORTED.format(step=done), gr.update(visible=False, value=False)


def _exportable(jobs: JobManager, who: Visitor | None) -> tuple[Path, RunScores, int]:
    """The run folder of `who`'s job, its scores as the folder keeps them now and their pick; Refused says
    why not."""
    snap = jobs.view(who.id if who else None)
    if not snap.run_dir or not snap.scores.rows:
        raise Refused(texts.NO_SCORED_RUN)
    if not jobs.owns(snap.job_id, who):
        raise Refused(texts.NOT_YOUR_RUN)
    if snap.active or snap.queued:
        raise Refused(texts.STILL_TRAINING)
    scores = run_scores(Path(snap.run_dir))
    if not scores.rows:
        raise Refused(texts.NO_SCORED_RUN)
    if scores.pick is None:
        raise Refused(texts.NO_PICK.format(reason=scores.reason))
    return Path(snap.run_dir), scores, scores.pick


def _export(run_dir: Path, step: int, replace: bool) -> int:
    """trainer.export's export of checkpoint `step`; its step, or Refused with its words."""
    from trainer.export import export_checkpoint  # loads the base model's parts: imported when used

    try:
        return export_checkpoint(run_dir, step, replace_current=replace).step
    except UserError as err:  # ConfigError: still training, no such checkpoint, the weights would be lost
        raise Refused(str(err)) from None
    except Exception as err:  # a disk or model error: said, and the traceback in the server log
        log.exception("Using checkpoint %s of %s failed", step, run_dir)
        raise Refused(error_message(err)) from None
