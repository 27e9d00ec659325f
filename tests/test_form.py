"""space/form.py: the Train form's values → TrainConfig, its rows, the concept presets and the prompts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from ui_fixtures import CPU, form_values

from space.form import (
    FORM,
    PRESETS,
    Concept,
    checkpoint_every,
    form_to_config,
    initial_values,
    new_run_dir,
    preset_values,
    prompts_for,
    with_article,
)
from space.hardware_fit import safe_defaults
from space.presets import TOY_MODEL, model_settings
from trainer.config import ConfigError, TrainConfig
from trainer.toyworld import EXAMPLE_SETTINGS


def test_form_maps_every_field(tmp_path: Path, four_images: list[str]) -> None:
    config = form_to_config(form_values(four_images), tmp_path / "runs")
    assert isinstance(config, TrainConfig)
    assert config.instance_data == tuple(four_images)
    assert (config.pretrained_model, config.identifier, config.method) == ("some/model", "sks", "lora")
    assert (config.max_train_steps, config.learning_rate, config.gradient_accumulation_steps) == (6, 1e-4, 2)
    assert config.train_text_encoder and config.text_encoder_steps_fraction == 0.3
    assert (config.resolution, config.seed, config.checkpointing_steps, config.validation_steps) == (32, 7, 3, 2)
    assert config.use_8bit_adam and not config.gradient_checkpointing
    assert config.validation_prompts == ("a photo of sks dog",)  # empty validation prompt = instance prompt
    assert Path(config.output_dir).parent == tmp_path / "runs" and "sks" in Path(config.output_dir).name


def test_form_accepts_client_file_dicts_and_resolves_the_toy_model(tmp_path: Path, four_images: list[str]) -> None:
    values = form_values([{"path": p, "meta": {"_type": "gradio.FileData"}} for p in four_images], base_model=TOY_MODEL)
    config = form_to_config(values, tmp_path, resolve_model=lambda m: "/models/toy" if m == TOY_MODEL else m)
    assert config.instance_data == tuple(four_images) and config.pretrained_model == "/models/toy"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"instance_prompt": "a photo of a dog"}, "`instance_prompt` must contain the identifier 'sks'"),
        ({"identifier": "two words", "instance_prompt": "two words"}, "`identifier` must be one word"),
        ({"resolution": 33}, "`resolution` must be a positive multiple of 8, got 33"),
        ({"max_train_steps": 2.5}, "`max_train_steps` must be a whole number"),
        ({"learning_rate": "fast"}, "`learning_rate` must be a number"),
        ({"with_prior_preservation": True, "class_prompt": "a photo of sks dog"}, "`class_prompt` must not contain"),
        ({"base_model": " "}, "`pretrained_model` is required"),
    ],
)
def test_form_errors_are_the_engines_words(tmp_path: Path, four_images: list[str], changes: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        form_to_config(form_values(four_images, **changes), tmp_path)


@pytest.mark.parametrize("n", [0, 2, 21])
def test_form_wants_3_to_20_images(tmp_path: Path, n: int) -> None:
    with pytest.raises(ConfigError, match=f"`instance_data` needs 3 to 20 images, got {n}"):
        form_to_config(form_values([f"{i}.png" for i in range(n)]), tmp_path)


def test_every_form_row_names_a_trainconfig_field_and_starts_from_its_default() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {f.config for f in FORM if f.config} <= fields
    assert len({f.key for f in FORM}) == len(FORM)
    first = initial_values(safe_defaults(CPU))
    assert set(first) == {f.key for f in FORM}
    untouched = {"num_class_images", "gradient_accumulation_steps", "seed", "validation_steps"}
    assert {key: first[key] for key in untouched} == {key: getattr(TrainConfig(), key) for key in untouched}
    # The app scores each checkpoint (the engine does not by default), so checkpoints follow the steps.
    assert first["score_checkpoints"] and first["checkpointing_steps"] == checkpoint_every(first["max_train_steps"])
    assert (first["instance_prompt"], first["base_model"], first["resolution"]) == ("a photo of zwx dog", TOY_MODEL, 32)


def test_presets_follow_the_training_spaces() -> None:
    assert {c: p.text_encoder_fraction for c, p in PRESETS.items()} == {
        Concept.OBJECT: 0.30,
        Concept.PERSON: 0.65,
        Concept.STYLE: 0.15,
    }
    values = preset_values("person", 5, "full")
    assert values == {
        "max_train_steps": 1000,
        "learning_rate": 5e-6,
        "train_text_encoder": True,
        "text_encoder_steps_fraction": 0.65,
    }
    assert preset_values("style", 4, "lora")["learning_rate"] == 1e-4


def test_prompts_and_run_dirs(tmp_path: Path) -> None:
    assert prompts_for("zwx", "backpack", "object") == ("a photo of zwx backpack", "a photo of a backpack")
    assert prompts_for("zwx", "painting", "style") == ("a painting in the style of zwx", "a painting")
    assert prompts_for("zwx", "owl", "object") == ("a photo of zwx owl", "a photo of an owl")
    assert prompts_for("zwx", "illustration", "style") == ("an illustration in the style of zwx", "an illustration")
    articles = {noun: with_article(noun) for noun in ("unicorn", "house", "hour", "umbrella", "the Eiffel tower")}
    assert articles == {"unicorn": "a unicorn", "house": "a house", "hour": "an hour",
                        "umbrella": "an umbrella", "the Eiffel tower": "the Eiffel tower"}
    first = new_run_dir(tmp_path, "zwx / é")
    first.mkdir()
    second = new_run_dir(tmp_path, "zwx / é")
    assert first != second and first.name.endswith("-zwx") and not second.exists()


def test_the_form_sets_lora_rank_and_cache_latents(tmp_path: Path, four_images: list[str]) -> None:
    config = form_to_config(form_values(four_images, lora_rank=16.0, cache_latents=False), tmp_path)
    assert (config.lora_rank, config.cache_latents) == (16, False)
    empty = form_to_config(form_values(four_images, lora_rank=None), tmp_path)  # empty: TrainConfig's default
    assert (empty.lora_rank, empty.cache_latents) == (TrainConfig().lora_rank, TrainConfig().cache_latents)
    toy = form_to_config(form_values(four_images, base_model=TOY_MODEL, lora_rank=2), tmp_path, model_settings=model_settings)
    assert toy.lora_rank == 2  # what the form shows wins over the toy model's hidden rank
    with pytest.raises(ConfigError, match="`lora_rank` must be a whole number"):
        form_to_config(form_values(four_images, lora_rank=2.5), tmp_path)


def test_the_toy_models_hidden_settings_never_override_the_form(tmp_path: Path, four_images: list[str]) -> None:
    toy_run = form_to_config(form_values(four_images, base_model=TOY_MODEL), tmp_path, model_settings=model_settings)
    assert toy_run.lora_rank == EXAMPLE_SETTINGS["lora_rank"] != TrainConfig().lora_rank
    assert (toy_run.max_train_steps, toy_run.learning_rate, toy_run.identifier) == (6, 1e-4, "sks")
    other = form_to_config(form_values(four_images), tmp_path, model_settings=model_settings)
    assert other.lora_rank == TrainConfig().lora_rank and other.report_to == TrainConfig().report_to
