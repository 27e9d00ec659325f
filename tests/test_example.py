"""space/example.py: the toy world's example and the prompts suggested for the toy model."""

from __future__ import annotations

from pathlib import Path

from space.example import TOY_PROMPTS, example_form, example_images, suggested_prompts
from space.form import form_to_config
from space.presets import TOY_MODEL, ToyModel, model_settings
from trainer.config import TrainConfig
from trainer.toyworld import EXAMPLE_INSTANCE_PROMPT, EXAMPLE_PROMPTS, example_config


def test_the_example_fills_the_form_with_what_example_config_trains(tmp_path: Path) -> None:
    photos = example_images(tmp_path / "example")
    assert len(photos) == 5 and all(Path(p).is_file() for p in photos)
    assert example_images(tmp_path / "example") == photos  # written once, then reused
    values = example_form(photos)
    assert values["base_model"] == TOY_MODEL and values["instance_prompt"] == EXAMPLE_INSTANCE_PROMPT
    assert values["validation_prompt"] == EXAMPLE_PROMPTS[1]

    config = form_to_config(
        values,
        tmp_path / "runs",
        resolve_model=lambda m: "/models/toy" if m == TOY_MODEL else m,
        model_settings=model_settings,
    )
    expected = example_config("/models/toy", tmp_path / "example", config.output_dir).to_dict()
    differ = {field for field, value in config.to_dict().items() if expected[field] != value}
    # Files rather than their folder; one sample prompt; scored like the app's runs, at four checkpoints, and
    # sampled at those checkpoints.
    assert differ == {"instance_data", "validation_prompts", "score_checkpoints", "checkpointing_steps",
                      "validation_steps"}
    assert config.score_checkpoints and config.checkpointing_steps == config.max_train_steps // 4
    assert config.validation_steps == config.checkpointing_steps
    assert config.instance_data == tuple(photos) and config.validation_prompts == (EXAMPLE_PROMPTS[1],)


def test_suggested_prompts_for_the_toy_model_and_the_example_run(tmp_path: Path, toy: ToyModel) -> None:
    assert suggested_prompts(TOY_MODEL, toy) == list(TOY_PROMPTS)
    assert "a photo of a red star on a white background" in TOY_PROMPTS
    example_run, other_run = tmp_path / "example-run", tmp_path / "other-run"
    for run, prompt in ((example_run, EXAMPLE_INSTANCE_PROMPT), (other_run, "a photo of sks dog")):
        run.mkdir()
        TrainConfig(pretrained_model=str(toy.folder), instance_prompt=prompt, resolution=64).save(run / "config.json")
    assert suggested_prompts(str(example_run), toy) == list(EXAMPLE_PROMPTS)
    assert suggested_prompts(str(other_run), toy) == [] and suggested_prompts("user/model", toy) == []
    assert toy.is_toy(str(example_run)) and toy.native_size(str(example_run)) == 64  # a run of the toy model
    assert toy.native_size(str(other_run)) == 64 and not toy.is_toy("user/model")  # samples at its size
