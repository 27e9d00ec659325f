"""Training on several processes through `accelerate launch` (DDP over gloo on this CPU).

Each process takes its own rows of every global batch (trainer/data/batches.py), gradients are averaged,
and only the main process writes. The claims, each against a plain one-process run of the same
global batch: the weights end the same, the class images are made once between the processes, and a
checkpoint moves between 2 and 1 processes both ways. "The same" is stated in Adam steps (each
moves a weight by about the learning rate): at least 99.9% of the weights within 1% of one step, and
none further than half a step; float sums in another order are all that differs. Measured
(full fine-tuning at lr 1e-4, 6 steps): 0.07% of the UNet's weights beyond 1% of a step, the largest
difference 0.24 of a step (2.4e-5), where a gradient is about zero and Adam's division magnifies
the rounding; the text encoder all within 1% of a step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from launch_helpers import assert_same_weights, json_events, launch, metrics, square_photos
from train_helpers import tiny_config

from trainer.run_folder import read_status

pytestmark = pytest.mark.slow

LR = 1e-4  # full fine-tuning at this rate moves the tiny model's weights well clear of float noise


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir: Path) -> dict[str, object]:
    """One run on 1 process × batch 2 and one on 2 processes × batch 1, both checkpointing at step 4 of
    6: full fine-tuning of the UNet and the text encoder, prior preservation, checkpointing, 8-bit AdamW."""
    root = tmp_path_factory.mktemp("multiprocess")
    config = tiny_config(tiny_model_dir, square_photos(root / "photos"), root / "unused", method="full", train_text_encoder=True,
                         gradient_checkpointing=True, with_prior_preservation=True, num_class_images=4,
                         class_prompt="a photo of a square", class_cache_dir=str(root / "cache-2"),
                         sample_batch_size=2, checkpointing_steps=4, learning_rate=LR)
    path = root / "config.json"
    config.save(path)
    two_events = json_events(launch(2, path, root / "two", "--train-batch-size", "1"))
    one_events = json_events(launch(1, path, root / "one", "--train-batch-size", "2",
                                    "--class-cache-dir", str(root / "cache-1")))
    return {"root": root, "config": path, "one": root / "one", "two": root / "two",
            "one_events": one_events, "two_events": two_events}


def test_two_processes_end_where_one_process_with_the_same_global_batch_ends(runs):
    one, two = runs["one"], runs["two"]
    assert_same_weights(one, two, LR)
    # Each process took its own row of every step: together, the photos one process took in pairs.
    assert [m["images"] for m in metrics(one)] == [m["images"] for m in metrics(two)]
    assert all(len(set(m["images"])) == 2 for m in metrics(two))
    # The losses logged are the mean over the processes: the one-process run's loss of the same rows.
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # The effective batch is said at the start and kept in run.json.
    assert read_status(two)["processes"] == 2 and read_status(two)["effective_batch"] == 2
    assert read_status(one)["processes"] == 1 and read_status(one)["effective_batch"] == 2
    training = next(e["message"] for e in runs["two_events"] if e["type"] == "phase" and e["phase"] == "training")
    assert "effective batch 2 (+ as many class images) = 1 per process × 2 processes (DDP) × 1 accumulation step" in training
    # Only the main process wrote: one line per step, one result.
    assert [m["step"] for m in metrics(two)] == list(range(1, 7))
    assert sum(e["type"] == "result" for e in runs["two_events"]) == 1


def test_class_images_are_made_once_split_between_the_processes(runs):
    import numpy as np
    from PIL import Image

    root = runs["root"]
    (two_cache,) = (root / "cache-2").iterdir()
    (one_cache,) = (root / "cache-1").iterdir()
    names = sorted(p.name for p in two_cache.glob("class-*.png"))
    assert names == [f"class-{i:05d}.png" for i in range(4)]
    assert json.loads((two_cache / "manifest.json").read_text())["images"] == 4
    # The main process made its half (the other process the rest: the cache is complete) ...
    made = [e for e in runs["two_events"] if e["type"] == "progress" and e["phase"] == "class-images"]
    assert made[-1]["done"] == made[-1]["total"] == 2
    # ... and image i is seeded by i, each process makes whole batches (here of 2) of what is missing:
    # every image comes out of the same batch as when one process makes them all, the same bytes.
    for name in names:
        assert np.array_equal(np.asarray(Image.open(two_cache / name)), np.asarray(Image.open(one_cache / name)))


@pytest.mark.parametrize(("written_by", "resumed_on"), [("two", 1), ("one", 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, written_by, resumed_on):
    root = runs["root"]
    checkpoint = runs[written_by] / "checkpoints" / "checkpoint-000004"
    assert json.loads((checkpoint / "state.json").read_text())["samples_seen"] == 8
    out = root / f"{written_by}-resumed-on-{resumed_on}"
    shutil.rmtree(out, ignore_errors=True)
    batch = "2" if resumed_on == 1 else "1"
    events = json_events(launch(resumed_on, runs["config"], out, "--train-batch-size", batch,
                                "--resume-from-checkpoint", str(checkpoint), "--class-cache-dir", str(root / "cache-2")))
    assert any("Resumed from checkpoint-000004 at step 4" in e.get("message", "") for e in events)
    assert [m["step"] for m in metrics(out)] == [5, 6]
    # The data order goes on where the checkpoint left it, and the run ends as the uninterrupted one.
    assert [m["images"] for m in metrics(out)] == [m["images"] for m in metrics(runs["one"])][4:]
    assert_same_weights(runs["one"], out, LR)
