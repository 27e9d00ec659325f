"""space/hardware_fit.py: what fits this GPU: the memory line, the settings picked for it, the defaults
they make and the values a new base model brings."""

from __future__ import annotations

import pytest
from ui_fixtures import A100, CPU, GPU16, SDXL_BASE, memory_form

from space.hardware import Hardware
from space.hardware_fit import (
    base_model_values,
    form_config,
    form_memory_note,
    memory_settings,
    model_shapes,
    safe_defaults,
)
from space.presets import KNOWN_MODELS, TOY_MODEL, default_resolution
from trainer.memory.estimate import SCORER_BYTES, SCORERS, estimate
from trainer.toyworld import EXAMPLE_SETTINGS, TOY_RESOLUTION


def test_safe_defaults_fit_the_hardware() -> None:
    cpu = safe_defaults(Hardware("cpu", "CPU", None))
    assert cpu["base_model"] == TOY_MODEL and cpu["mixed_precision"] == "no" and not cpu["use_8bit_adam"]
    assert cpu["resolution"] == default_resolution(TOY_MODEL) == 32
    # On a GPU the memory model picks (tests/test_memory.py checks it is the best that fits): a T4
    # (15 GB) fine-tunes SD 1.5 fully in fp16 (the target: full DreamBooth in 10 GB with
    # 8-bit Adam and checkpointing); an A100 has room for it all in bf16, no savings needed.
    t4 = safe_defaults(Hardware("cuda", "Tesla T4", 15.0))
    assert (t4["method"], t4["mixed_precision"], t4["resolution"]) == ("full", "fp16", 512)
    a100 = safe_defaults(Hardware("cuda", "A100", 80.0, bf16=True))
    assert (a100["method"], a100["mixed_precision"], a100["use_8bit_adam"], a100["gradient_checkpointing"]) == (
        "full",
        "bf16",
        False,
        False,
    )


def test_safe_defaults_for_sdxl_on_a_16gb_card() -> None:
    xl = safe_defaults(GPU16, family="sdxl")
    assert xl["base_model"] == SDXL_BASE and (xl["resolution"], xl["lora_rank"]) == (1024, 16)
    assert (xl["method"], xl["mixed_precision"], xl["cache_latents"]) == ("lora", "fp16", True)
    picked = {key: xl[key] for key in ("method", "resolution", "use_8bit_adam", "gradient_checkpointing",
                                       "mixed_precision", "train_batch_size", "train_text_encoder")}
    assert "Fits your GPU" in form_memory_note(GPU16, memory_form(SDXL_BASE, **picked))  # the preset fits
    # with scores on (the app's default) too: the picker sized it with the scoring models loaded
    assert "Fits your GPU" in form_memory_note(GPU16, memory_form(SDXL_BASE, **picked, score_checkpoints=True))
    sd = safe_defaults(GPU16)  # SD 1.5: its first known model at 512 px, SD's LoRA rank
    first = next(iter(KNOWN_MODELS))
    assert (sd["base_model"], sd["resolution"], sd["lora_rank"]) == (first, 512, 4)
    big = safe_defaults(A100, family="sdxl")  # 80 GB: room to fine-tune the whole SDXL UNet
    assert (big["method"], big["mixed_precision"]) == ("full", "bf16")
    assert safe_defaults(GPU16, offline=True, family="sdxl")["base_model"] == TOY_MODEL  # no Hub: the toy model
    assert safe_defaults(CPU, family="sdxl")["base_model"] == TOY_MODEL


@pytest.mark.parametrize(
    ("hardware", "changes", "words"),
    [
        (GPU16, {"method": "full", "use_8bit_adam": False, "gradient_checkpointing": False}, "Use LoRA"),
        (GPU16, {"gradient_checkpointing": False, "train_batch_size": 4}, "Turn on gradient checkpointing"),
        (Hardware("cuda", "RTX 3060", 11.7), {"method": "full", "train_text_encoder": True}, "Use LoRA"),
        (Hardware("cuda", "small", 2.0), {}, "use a GPU with more memory"),
    ],
)
def test_the_memory_line_says_what_does_not_fit_and_what_would(hardware: Hardware, changes: dict, words: str) -> None:
    note = form_memory_note(hardware, memory_form(SDXL_BASE, **changes))
    assert note is not None and "Does not fit your GPU" in note and words in note
    assert f"of {hardware.memory_gb:.1f} GB" in note


@pytest.mark.parametrize(
    ("hardware", "base_model", "changes"),
    [
        (CPU, SDXL_BASE, {"method": "full"}),  # no CUDA: nothing to size
        (Hardware("mps", "Apple GPU (MPS)", None), SDXL_BASE, {}),
        (GPU16, "nobody/unknown-model", {}),  # an unknown family
        (GPU16, TOY_MODEL, {"method": "full"}),  # the toy model fits anywhere
        (GPU16, SDXL_BASE, {"resolution": None}),  # a number box being edited
    ],
)
def test_the_memory_line_is_silent_when_there_is_nothing_to_size(hardware: Hardware, base_model: str,
                                                                 changes: dict) -> None:
    assert form_memory_note(hardware, memory_form(base_model, **changes)) is None


def test_a_new_base_model_brings_its_familys_presets() -> None:
    kind, values = base_model_values(GPU16, SDXL_BASE, previous="sd")
    picked = memory_settings(GPU16, "sdxl", SDXL_BASE)  # what fits this card best (tests/test_memory.py)
    assert kind == "sdxl" and values == {"lora_rank": 16, "learning_rate": 1e-4, **picked}
    assert (values["resolution"], values["method"], values["cache_latents"]) == (1024, "lora", True)
    back, values = base_model_values(A100, next(iter(KNOWN_MODELS)), previous="sdxl")
    assert back == "sd" and (values["method"], values["learning_rate"], values["lora_rank"]) == ("full", 5e-6, 4)
    # Within a family only the size follows the model, as before; the toy model brings its size and rank.
    assert base_model_values(GPU16, "stabilityai/stable-diffusion-2-1", previous="sd") == ("sd", {"resolution": 768})
    assert base_model_values(GPU16, TOY_MODEL, previous="sdxl") == (
        "toy",  # and its class-image batch: 32 px images, many at once
        {
            "resolution": TOY_RESOLUTION,
            "lora_rank": EXAMPLE_SETTINGS["lora_rank"],
            "sample_batch_size": EXAMPLE_SETTINGS["sample_batch_size"],
        },
    )
    assert base_model_values(GPU16, "nobody/unknown-model", previous="sd") == (None, {})  # not guessed


def test_scores_take_no_gpu_memory_from_the_training_only_ram() -> None:
    shapes = model_shapes(SDXL_BASE, "sdxl")
    plain = estimate(form_config(memory_form(SDXL_BASE)), "cuda", shapes=shapes)
    scored = estimate(form_config(memory_form(SDXL_BASE, score_checkpoints=True)), "cuda", shapes=shapes)
    assert SCORERS not in scored.weights_by_part  # the scorers run on the CPU
    assert scored.peak_ram - plain.peak_ram == SCORER_BYTES
    assert scored.peak_accelerator >= plain.peak_accelerator  # the scoring phase draws a prompt's images at once


@pytest.mark.parametrize(
    ("model", "gb", "expected", "words"),
    [
        ("black-forest-labs/FLUX.1-dev", 11.7, {"quantize_base": "nf4", "resolution": 512}, "Likely too small"),
        ("black-forest-labs/FLUX.1-dev", 12.0, {"quantize_base": "nf4", "resolution": 512}, "about 9 GB"),
        ("black-forest-labs/FLUX.1-dev", 15.77, {"quantize_base": "nf4", "resolution": 512}, "about 9 GB"),
        ("black-forest-labs/FLUX.1-dev", 16.0, {"quantize_base": "nf4", "resolution": 1024}, "1024 px"),
        ("black-forest-labs/FLUX.1-dev", 80.0, {"quantize_base": "none", "resolution": 1024}, "bf16"),
        ("stabilityai/stable-diffusion-3.5-medium", 12.0, {"quantize_base": "none", "resolution": 512}, "Medium"),
        ("stabilityai/stable-diffusion-3.5-medium", 24.0, {"quantize_base": "none", "resolution": 1024}, "Medium"),
        ("stabilityai/stable-diffusion-3.5-large", 16.0, {"quantize_base": "nf4", "resolution": 512}, "Large in NF4"),
        ("stabilityai/stable-diffusion-3.5-large", 24.0, {"quantize_base": "nf4", "resolution": 1024}, "Large in NF4"),
    ],
)
def test_sd3_and_flux_get_the_lora_settings_their_trainers_publish_for_the_card(
    model: str, gb: float, expected: dict, words: str
) -> None:
    """Until the memory model sizes transformers: LoRA, 8-bit Adam, checkpointing, and the quantization and size
    that the published peaks say fit (space.hardware_fit.TRANSFORMER_FITS), with the reason on the form."""
    from space.hardware_fit import pick
    from space.presets import model_family

    picked = pick(Hardware("cuda", "card", gb, bf16=True), model_family(model), model, 16)
    assert {key: picked.settings[key] for key in expected} == expected, picked
    assert picked.settings["method"] == "lora" and picked.settings["use_8bit_adam"]
    assert picked.settings["gradient_checkpointing"] and words in picked.why
