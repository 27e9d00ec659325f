"""space/presets.py: the base models the app offers, their families, sizes and LoRA ranks, and the toy model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ui_fixtures import A100, CPU, SDXL_BASE

from space.form import preset_values
from space.hardware_fit import safe_defaults
from space.presets import (
    FAMILY_PRESETS,
    KNOWN_MODELS,
    TOY_MODEL,
    ToyModel,
    default_resolution,
    lora_rank_for,
    model_choices,
    model_family,
    model_resolution,
)
from trainer.config import ConfigError, TrainConfig
from trainer.families import FAMILIES
from trainer.toyworld import EXAMPLE_SETTINGS, TOY_MODEL_DIR, TOY_MODEL_LABEL, TOY_RESOLUTION


def test_known_models_name_their_family_and_native_size() -> None:
    families = {f.name: f for f in FAMILIES}
    assert {known.family for known in KNOWN_MODELS.values()} == {"sd", "sdxl", "sd3", "flux"} == set(families)
    sdxl = [model_id for model_id, known in KNOWN_MODELS.items() if known.family == "sdxl"]
    assert sdxl[0] == SDXL_BASE and KNOWN_MODELS[SDXL_BASE].resolution == 1024 == default_resolution(SDXL_BASE)
    assert families["sdxl"].default_resolution == 1024
    assert default_resolution("stabilityai/stable-diffusion-2-1") == 768  # SD 2.1-v: its own size, not the family's
    assert next(iter(KNOWN_MODELS)) == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD first: least memory
    assert (SDXL_BASE, SDXL_BASE) in model_choices(A100, offline=False)


def test_a_base_models_family_is_read_without_the_network(tmp_path: Path) -> None:
    assert (model_family(TOY_MODEL), model_family(SDXL_BASE), model_family(next(iter(KNOWN_MODELS)))) == (
        "sd",
        "sdxl",
        "sd",
    )
    folders = {"xl": "StableDiffusionXLPipeline", "sd": "StableDiffusionPipeline", "flux": "FluxPipeline",
               "kontext": "FluxKontextPipeline"}
    for name, class_name in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    assert model_family(str(tmp_path / "xl")) == "sdxl" and model_resolution(str(tmp_path / "xl")) == 1024
    assert model_family(str(tmp_path / "sd")) == "sd" and model_resolution(str(tmp_path / "sd")) == 512
    assert model_family(str(tmp_path / "flux")) == "flux" and model_resolution(str(tmp_path / "flux")) == 1024
    assert model_family(str(tmp_path / "kontext")) is None  # not a family we train: the engine says so at Start
    # A Hub id neither known nor in the Hub cache, a folder that is not there: unknown, nothing fetched.
    assert model_family("nobody-here/never-downloaded-model") is None
    assert model_resolution("nobody-here/never-downloaded-model") is None
    assert model_family(str(tmp_path / "missing")) is None and model_family("") is None


def test_family_presets_set_the_learning_rate_and_rank() -> None:
    assert preset_values("person", 5, "full") == preset_values("person", 5, "full", "sd")  # SD as before
    xl_lora, xl_full = preset_values("object", 4, "lora", "sdxl"), preset_values("object", 4, "full", "sdxl")
    assert (xl_lora["learning_rate"], xl_full["learning_rate"]) == (1e-4, 5e-6)
    assert xl_lora["max_train_steps"] == 800 and xl_lora["text_encoder_steps_fraction"] == 0.30  # the concept's
    assert FAMILY_PRESETS["sd"].lora_rank == TrainConfig().lora_rank == lora_rank_for(next(iter(KNOWN_MODELS)))
    assert lora_rank_for(SDXL_BASE) == FAMILY_PRESETS["sdxl"].lora_rank == 16
    assert lora_rank_for(TOY_MODEL) == EXAMPLE_SETTINGS["lora_rank"] and lora_rank_for("nobody/x") is None


def test_the_toy_model_comes_first_without_a_gpu_or_the_hub(tmp_path: Path, toy: ToyModel) -> None:
    entry = (TOY_MODEL_LABEL, TOY_MODEL)
    assert model_choices(CPU, offline=False)[0] == entry
    assert model_choices(A100, offline=True)[0] == entry
    online = model_choices(A100, offline=False)
    assert online[0] == (next(iter(KNOWN_MODELS)),) * 2 and online[-1] == entry
    assert (safe_defaults(CPU)["base_model"], safe_defaults(CPU)["resolution"]) == (
        TOY_MODEL,
        TOY_RESOLUTION,
    )
    offline_gpu = safe_defaults(A100, offline=True)
    assert (offline_gpu["base_model"], offline_gpu["resolution"], offline_gpu["mixed_precision"]) == (
        TOY_MODEL,
        TOY_RESOLUTION,
        "bf16",
    )
    assert toy.resolve(TOY_MODEL) == str(toy.folder) and toy.is_toy(TOY_MODEL) and not toy.is_toy("a/b")
    assert toy.native_size(TOY_MODEL) == TOY_RESOLUTION and toy.native_size("a/b") is None

    # Without its folder the toy model is still the one offered; using it says what is missing.
    missing = ToyModel(tmp_path / "no-toy")
    assert not missing.installed and model_choices(CPU, offline=False)[0] == entry
    with pytest.raises(ConfigError, match="toy model is not installed"):
        missing.resolve(TOY_MODEL)


def test_the_shipped_toy_model_is_installed() -> None:
    toy = ToyModel()  # the real trainer/assets/toy-sd
    assert toy.installed and model_choices(CPU, offline=False)[0] == (TOY_MODEL_LABEL, TOY_MODEL)
    assert toy.resolve(TOY_MODEL) == str(TOY_MODEL_DIR)
    unet = json.loads((TOY_MODEL_DIR / "unet" / "config.json").read_text())
    vae = json.loads((TOY_MODEL_DIR / "vae" / "config.json").read_text())
    native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    assert native == TOY_RESOLUTION == default_resolution(TOY_MODEL)
