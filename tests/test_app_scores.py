"""The app's side of checkpoint scores: the job's snapshot keeps the scores and the pick (from the
training's ScoreEvents, then from the run folder), the Train tab draws them under the loss plot, and
"Use this checkpoint" makes the pick the run's weights, for its owner, once the run has stopped
training. The last test trains the tiny model with tiny random DINOv2 and CLIP models (tests/tiny_scorers.py)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from train_helpers import tiny_config
from ui_fixtures import CPU

from space import texts
from space.jobs import JobManager
from space.presets import ToyModel
from space.run_scores import RunScores
from space.scores_panel import ScoresPanel, scores_frame, summary
from space.train_tab import PollState, TrainDeps, on_steps, poll, use_checkpoint
from trainer.config import TrainConfig
from trainer.events import (
    CancelToken,
    Event,
    PhaseEvent,
    RunResult,
    ScoreEvent,
    StepEvent,
    event_from_json,
    event_to_json,
)

SKIP = type(gr.skip())


def row(step: int, subject: float, prompt: float = 0.3, drift: float = 0.0, memorised: bool = False) -> dict:
    """One row of scores.jsonl as trainer/scores/measure.py writes it (the base model's at step 0)."""
    return {"step": step, **({"base": True} if step == 0 else {}), "subject": subject, "subject_clip": None,
            "prompt": prompt, "drift": drift, "div_kept": 1.0, "memorisation": 0.97 if memorised else 0.5,
            "memorised": memorised, "memorisation_threshold": 0.9, "scored_with": "judge", "seconds": 0.1}


def visitor(name: str) -> SimpleNamespace:
    """What gradio's Request tells the handlers of a visitor logged in as `name`."""
    return SimpleNamespace(username=name, session_hash=f"page-of-{name}")


def test_the_scores_frame_and_the_line_under_it() -> None:
    rows = [row(0, 0.2), row(2, 0.6, drift=0.5), row(4, 0.8, memorised=True)]
    frame = scores_frame(rows)
    assert list(frame.columns) == ["step", "value", "score"] and len(frame) == 9 + 2  # long: 3 series a step
    assert set(frame["score"]) == {"subject fidelity", "prompt fidelity", "class drift", texts.PICKED_SERIES}
    unpicked = frame[frame["score"] == texts.PICKED_SERIES]
    assert list(unpicked["step"]) == [0, 0] and list(unpicked["value"]) == [0.0, 0.0]  # no length until a pick
    drift = frame[frame["score"] == "class drift"]
    assert list(drift["step"]) == [0, 2, 4] and list(drift["value"]) == [0.0, 0.5, 0.0]
    picked = scores_frame(rows, pick=2)
    line = picked[picked["score"] == texts.PICKED_SERIES]
    assert list(line["step"]) == [2, 2] and list(line["value"]) == [0.0, 1.0]  # a vertical line at the pick
    empty = scores_frame(())
    assert empty.empty and (str(empty["step"].dtype), str(empty["value"].dtype)) == ("int64", "float64")

    scores = RunScores(tuple(rows), 4, "step 4: subject fidelity 0.800")
    line = summary(scores, weights=4)
    assert "**Picked:** step 4: subject fidelity 0.800" in line and "weights are from step 4" in line
    assert "**Memorisation:** at step 4" in line and "0.97 similar" in line
    none = summary(RunScores(tuple(rows[:2]), None, "no checkpoint passed: the class drifted"))
    assert "**No checkpoint picked:** no checkpoint passed" in none and "Memorisation" not in none
    assert texts.scores_title(4) == "Scores · picked: step 4"


def test_checkpoints_follow_the_steps_while_scoring_is_on() -> None:
    assert on_steps(800, True) == 200 and on_steps(6, True) == 2 and on_steps(1, True) == 1
    assert all(isinstance(on_steps(steps, scored), SKIP) for steps, scored in ((800, False), (None, True), (0, True)))


def scoring_train(scored: threading.Event, release: threading.Event):
    """A train() stand-in that scores the base model and steps 2 (twice: a rescore replaces it) and 4, sets
    `scored`, then waits for `release`. Its events cross a JSON line each, as a training process's do."""

    def train(config: TrainConfig, emit, cancel: CancelToken) -> RunResult:
        def on_event(event: Event) -> None:
            emit(event_from_json(event_to_json(event)))

        on_event(PhaseEvent("training"))
        on_event(ScoreEvent(0, row(0, 0.2), None, "no checkpoint scored yet"))
        on_event(StepEvent(2, 4, 1.0, 1e-4, 1.0))
        on_event(ScoreEvent(2, row(2, 0.5), 2, "step 2: first"))
        on_event(ScoreEvent(2, row(2, 0.6), 2, "step 2: rescored"))
        on_event(ScoreEvent(4, row(4, 0.4), 2, "step 2: still the best"))
        scored.set()
        release.wait(10)
        return RunResult(Path(config.output_dir), "completed", 4, 4, None, None)

    return train


def test_score_events_fill_the_snapshot_and_the_panel_and_a_running_job_is_not_exported(tmp_path: Path) -> None:
    scored, release = threading.Event(), threading.Event()
    deps = TrainDeps(JobManager(scoring_train(scored, release), gpu_count=0), tmp_path, ToyModel(), CPU)
    deps.jobs.start(TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=4, instance_prompt="sks"),
                    owner="ann")
    try:
        assert scored.wait(10)
        snap = deps.jobs.snapshot()
        assert [r["step"] for r in snap.scores.rows] == [0, 2, 4] and snap.scores.rows[1]["subject"] == 0.6
        assert (snap.scores.pick, snap.scores.reason) == (2, "step 2: still the best")
        job = snap.as_dict()
        assert [r["step"] for r in job["scores"]] == [0, 2, 4] and job["pick"] == 2
        json.dumps(job)  # plain data for API clients

        seen, panel = drawn(deps, PollState(), "ann")
        assert panel["box"]["visible"] and len(panel["plot"]["value"]) == 9 + 2  # 3 series x 3 steps, the pick
        assert panel["plot"]["title"] == "Scores so far · best so far: step 2"  # no verdict while it trains
        assert "**Best so far:** step 2" in panel["line"] and "still the best" not in panel["line"]
        assert panel["use"]["visible"] and not panel["use"]["interactive"]  # its owner's, but still training
        assert all(isinstance(v, SKIP) for v in drawn(deps, seen, "ann")[1].values())  # nothing changed
        assert all(isinstance(v, SKIP) for v in drawn(deps, PollState(), "eve")[1].values())  # nothing of ann's

        with pytest.warns(UserWarning, match="still training"):
            _, result, _ = use_checkpoint(deps, False, visitor("ann"))
        assert result == texts.STILL_TRAINING
    finally:
        release.set()
        deps.jobs.wait(10)
    seen, panel = drawn(deps, seen, "ann")
    assert panel["use"]["interactive"]  # stopped: now it may be pressed
    assert panel["plot"]["title"] == "Scores · picked: step 2" and "**Picked:** step 2: still the best" in panel["line"]


def drawn(deps: TrainDeps, last: PollState, name: str) -> tuple[PollState, dict]:
    """What the poll draws of the scores panel for visitor `name`, by component."""
    values = poll(deps, last, visitor(name))
    return values[0], dict(zip(ScoresPanel.DRAWN, values[-len(ScoresPanel.DRAWN):], strict=True))


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tiny_scorers import build_tiny_scorers

    return build_tiny_scorers(tmp_path_factory.mktemp("scorers"))


def test_use_this_checkpoint_makes_the_pick_the_runs_weights_for_its_owner(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path, tiny_scorers: tuple[Path, Path]
) -> None:
    from trainer import train
    from trainer.run_folder import read_status

    run = tmp_path / "runs" / "run"
    config = tiny_config(tiny_model_dir, subject_images, run, max_train_steps=4, score_checkpoints=True,
                         checkpointing_steps=2, score_samples=2, score_inference_steps=2,
                         score_image_model=str(tiny_scorers[0]), score_clip_model=str(tiny_scorers[1]))
    deps = TrainDeps(JobManager(train, gpu_count=0), tmp_path / "runs", ToyModel(), CPU)
    deps.jobs.start(config, owner="ann")
    done = deps.jobs.wait(300)
    assert done.state == "completed" and [r["step"] for r in done.scores.rows] == [0, 2, 4], done
    assert read_status(run)["weights_step"] == 4

    # Make step 2 the pick (the rows are the pick's only input), and lose the last step's checkpoint, as
    # pruning would: the weights the run has now are then in no checkpoint.
    rows = [{**r, "prompt": 0.3, "drift": 0.0, "subject": 0.9 if r["step"] == 2 else 0.1} for r in done.scores.rows]
    (run / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(run / "checkpoints" / "checkpoint-000004")
    lora = run / "pytorch_lora_weights.safetensors"
    before = lora.read_bytes()

    with pytest.warns(UserWarning, match="no scored run"):  # eve has no run; ann's is not hers to see
        assert use_checkpoint(deps, False, visitor("eve"))[1] == texts.NO_SCORED_RUN
    with pytest.warns(UserWarning, match="would lose them"):
        _, result, replace = use_checkpoint(deps, False, visitor("ann"))
    assert "from step 4) are in no checkpoint: using step 2 would lose them" in result and replace["visible"]
    assert lora.read_bytes() == before and read_status(run)["weights_step"] == 4  # nothing replaced yet

    line, result, replace = use_checkpoint(deps, True, visitor("ann"))  # confirmed
    assert result == "Step 2 is now the run's weights." and not replace["visible"]
    assert "The run's weights are from step 2." in line
    assert read_status(run)["weights_step"] == 2 and lora.read_bytes() != before
    assert use_checkpoint(deps, False, visitor("ann"))[1] == "Step 2 is already the run's weights."
