"""The toy world end to end, CI-sized: the generator, the judge, the pretrained toy model, and a
DreamBooth run on the example subject that must visibly learn it (trainer.toyworld.eval, small counts)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from trainer.toyworld import TOY_MODEL_DIR, example_subject
from trainer.toyworld.world import Scene, held_out_combos, random_scene, render, train_combos

# Floors under the pretrained model's measured accuracy (see docs/toyworld.md), with slack for
# the few samples drawn here: a broken export or a wrong scheduler falls far below them.
HELD_OUT_FLOOR = {"shape": 0.6, "color": 0.6, "background": 0.6}


@pytest.fixture(scope="module")
def judge():
    from trainer.toyworld.judge import Judge

    return Judge()


@pytest.fixture(scope="module")
def toy_pipe():
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)  # on a shared 2-core machine one thread is many times faster than two
    pipe = StableDiffusionPipeline.from_pretrained(TOY_MODEL_DIR, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_world_is_deterministic_and_held_out_is_disjoint() -> None:
    scene = Scene("star", "red", "white", scale=0.3, dx=0.1)
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
    assert scene.caption() == "a photo of a red star on a white background"
    a, b = random.Random(3), random.Random(3)
    assert random_scene(a) == random_scene(b)
    assert not set(held_out_combos()) & set(train_combos())


def test_judge_reads_the_world(judge) -> None:
    rng = random.Random(77)
    scenes = [random_scene(rng, split_fraction=0.4) for _ in range(200)]
    readings = judge.read([render(s) for s in scenes])
    for attribute in ("shape", "color", "color2", "background"):
        accuracy = np.mean([getattr(r, attribute) == getattr(s, attribute) for r, s in zip(readings, scenes, strict=True)])
        assert accuracy >= 0.95, f"judge {attribute} accuracy {accuracy:.2f}"


def test_toy_model_is_small_and_follows_held_out_prompts(judge, toy_pipe) -> None:
    from trainer.toyworld.accuracy import ATTRIBUTES, prompt_accuracy

    size = sum(f.stat().st_size for f in TOY_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"toy model is {size / 2**20:.1f} MB"
    # 10 of the 20 held-out combinations, 2 images each: what trainer.toyworld.accuracy measures, CI-sized.
    accuracy = prompt_accuracy(toy_pipe, judge, held_out_combos()[::2], per_combo=2, steps=15)
    assert set(accuracy) == set(ATTRIBUTES) == set(HELD_OUT_FLOOR)
    for attribute, floor in HELD_OUT_FLOOR.items():
        assert accuracy[attribute] >= floor, (attribute, accuracy)


def test_prompt_accuracy_counts_each_attribute_the_judge_reads_as_prompted() -> None:
    from trainer.toyworld.accuracy import prompt_accuracy
    from trainer.toyworld.judge import Reading

    class Drawn:
        """A pipeline that draws nothing: the judge below reads its images as the test says."""

        def __call__(self, prompts, **kwargs):
            return type("Output", (), {"images": [None] * len(prompts)})()

    class Judged:
        def __init__(self, readings):
            self.readings = iter(readings)

        def read(self, images):
            return [next(self.readings) for _ in images]

    combos = [("star", "red", "white"), ("square", "blue", "black")]
    # Per combo, 2 images: the star's two are right but for one wrong background; the square's one wrong shape.
    readings = [Reading("star", "red", None, "white"), Reading("star", "red", None, "gray"),
                Reading("square", "blue", None, "black"), Reading("circle", "blue", None, "black")]
    accuracy = prompt_accuracy(Drawn(), Judged(readings), combos, per_combo=2)
    assert accuracy == {"shape": 0.75, "color": 1.0, "background": 0.75}


def test_example_subject_is_new_to_the_base_model(tmp_path: Path) -> None:
    folder = example_subject(tmp_path / "subject")
    images = sorted(folder.glob("*.png"))
    assert len(images) == 5
    from PIL import Image

    assert all(Image.open(p).size == (64, 64) for p in images)


@pytest.mark.slow
def test_dreambooth_learns_the_example_subject(tmp_path: Path) -> None:
    from trainer.toyworld.eval import main

    # The example's LoRA at half its steps and without the prior: ~30 s of training.
    results = main(["--example", "--method", "lora", "--no-prior", "--steps", "600", "--samples", "8",
                    "--output-dir", str(tmp_path / "run"), "--threads", "1", "--json", str(tmp_path / "r.json")])
    print(results)
    base, trained = results["base"], results["trained"]
    assert base["subject_accuracy"] <= 0.1, "the base model should not draw the subject from text alone"
    assert trained["subject_accuracy"] >= 0.5  # measured: 0.75
    assert trained["subject_similarity"] >= base["subject_similarity"] + 0.08  # measured: 0.741 -> 0.856
    assert (tmp_path / "r.json").is_file()


def test_eval_refuses_seeds_it_cannot_train(tmp_path: Path) -> None:
    from trainer.toyworld.eval import main

    with pytest.raises(SystemExit, match="--seeds must be at least 1"):
        main(["--example", "--seeds", "0"])
    with pytest.raises(SystemExit, match="1 with --run"):
        main(["--example", "--run", str(tmp_path), "--seeds", "2"])
