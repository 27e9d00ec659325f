"""The Generate service on the tiny model: requests, model resolution, the cache, and images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from trainer.inference import (
    SCHEDULERS,
    GenerateRequest,
    PipelineCache,
    default_dtype,
    generate,
    resolve_model,
)
from trainer.publish.card import write_model_card
from trainer.run_folder import lora_base_model

SMALL = {"width": 32, "height": 32, "steps": 2}


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in images]


# --- requests ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 500}, "`width` and `height` must be multiples of 8, got 500 and 512"),
        ({"height": 100, "width": 64}, "`width` and `height` must be multiples of 8, got 64 and 100"),
        ({"width": 4096}, "`width` and `height` must be between 8 and 2048, got 4096 and 512"),
        ({"prompt": "  "}, "`prompt` must not be empty"),
        ({"steps": 0}, "`steps` must be between 1 and 200, got 0"),
        ({"guidance_scale": -1.0}, "`guidance_scale` must be >= 0, got -1.0"),
        (
            {"scheduler": "Heun"},
            "`scheduler` must be one of DPM++ 2M, Euler ancestral, Euler, DDIM, PNDM, UniPC",
        ),
        ({"seed": -1}, "`seed` must be between 0 and 2**63 - 1, got -1"),
        ({"num_images": 9}, "`num_images` must be between 1 and 8, got 9"),
        ({"lora_scale": 3.0}, "`lora_scale` must be between 0 and 2, got 3.0"),
    ],
)
def test_bad_requests_are_refused_with_exact_messages(changes: dict, message: str) -> None:
    request = GenerateRequest(**{"prompt": "a photo of sks dog", **changes})
    with pytest.raises(ValueError) as failure:
        request.validate()
    assert str(failure.value).startswith(message)


def test_defaults_are_valid_and_every_scheduler_is_offered() -> None:
    assert GenerateRequest("a dog").validate().scheduler == "DPM++ 2M"
    assert {"DPM++ 2M", "Euler ancestral", "DDIM", "PNDM", "Euler", "UniPC"} <= set(SCHEDULERS)
    assert default_dtype("cuda") == torch.float16 and default_dtype("cpu") == torch.float32


# --- model resolution ----------------------------------------------------------------------
def test_resolve_a_pipeline_folder_and_a_lora_run(tiny_model_dir: Path, lora_run: Path) -> None:
    full = resolve_model(str(tiny_model_dir))
    assert (full.kind, full.pipeline_dir, full.lora_dir) == ("full", tiny_model_dir, None)

    lora = resolve_model(str(lora_run))  # no card yet: the base comes from config.json
    assert (lora.kind, lora.pipeline_dir, lora.lora_dir) == ("lora", tiny_model_dir, lora_run)


def test_a_lora_base_is_read_from_the_card_before_the_config(lora_run: Path, tmp_path: Path, tiny_model_dir):
    write_model_card(lora_run)
    assert lora_base_model(lora_run) == (str(tiny_model_dir), None)  # local base: the config's path
    other = tmp_path / "copy-of-base"
    shutil.copytree(tiny_model_dir, other)
    card = (lora_run / "README.md").read_text()
    (lora_run / "README.md").write_text(card.replace("---\n", f"---\nbase_model: {other}\n", 1))
    assert lora_base_model(lora_run)[0] == str(other)
    assert resolve_model(str(lora_run)).pipeline_dir == other


def test_unusable_sources_get_clear_messages(tmp_path: Path, lora_run: Path) -> None:
    with pytest.raises(ValueError, match="No model given"):
        resolve_model(" ")
    with pytest.raises(ValueError, match="neither a local model folder nor a Hub repo id"):
        resolve_model(str(tmp_path / "missing" / "run"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no safetensors weights"):
        resolve_model(str(empty))
    config = TrainConfig.load(lora_run / "config.json")
    config.replace(pretrained_model=str(tmp_path)).save(lora_run / "config.json")
    with pytest.raises(ValueError, match="is not a diffusers pipeline"):
        resolve_model(str(lora_run))
    config.replace(pretrained_model=str(tmp_path / "gone")).save(lora_run / "config.json")
    with pytest.raises(ValueError, match="which is not on this machine"):
        resolve_model(str(lora_run))


# --- images --------------------------------------------------------------------------------
def test_image_i_is_what_seed_plus_i_gives_alone(tiny_model_dir: Path) -> None:
    pipe = PipelineCache().get(str(tiny_model_dir), "cpu")
    batch = generate(pipe, GenerateRequest("a photo of sks dog", seed=3, num_images=2, **SMALL))
    first = generate(pipe, GenerateRequest("a photo of sks dog", seed=3, **SMALL))
    second = generate(pipe, GenerateRequest("a photo of sks dog", seed=4, **SMALL))

    assert [image.size for image in batch] == [(32, 32), (32, 32)]
    np.testing.assert_array_equal(pixels(batch)[0], pixels(first)[0])
    np.testing.assert_array_equal(pixels(batch)[1], pixels(second)[0])
    assert not np.array_equal(pixels(first)[0], pixels(second)[0])


def test_every_scheduler_runs_without_changing_the_cached_pipeline(tiny_model_dir: Path) -> None:
    pipe = PipelineCache().get(str(tiny_model_dir), "cpu")
    original = type(pipe.scheduler)
    results = {}
    for name in SCHEDULERS:
        (image,) = generate(pipe, GenerateRequest("a photo of sks dog", scheduler=name, **SMALL))
        results[name] = pixels([image])[0]
        assert type(pipe.scheduler) is original
    assert not np.array_equal(results["DDIM"], results["Euler ancestral"])


def test_lora_scale_zero_gives_the_base_model(tiny_model_dir: Path, lora_run: Path) -> None:
    cache = PipelineCache()
    request = GenerateRequest("a photo of sks dog", seed=1, **SMALL)
    base = pixels(generate(cache.get(str(tiny_model_dir), "cpu"), request))[0]
    lora_pipe = cache.get(str(lora_run), "cpu")
    full_strength = pixels(generate(lora_pipe, request))[0]
    off = pixels(generate(lora_pipe, GenerateRequest("a photo of sks dog", seed=1, lora_scale=0.0, **SMALL)))[
        0
    ]

    np.testing.assert_array_equal(off, base)
    assert np.abs(full_strength - base).mean() > 1.0


def test_the_cache_keeps_one_pipeline_by_source(tiny_model_dir: Path, lora_run: Path) -> None:
    cache = PipelineCache()
    first = cache.get(str(tiny_model_dir), "cpu")
    assert cache.get(str(tiny_model_dir), "cpu") is first
    assert cache.get(f" {tiny_model_dir} ", "cpu", torch.float32) is first
    other = cache.get(str(lora_run), "cpu")
    assert other is not first
    assert cache.get(str(tiny_model_dir), "cpu") is not first  # one pipeline only: reloaded


# --- every model family ----------------------------------------------------------------------
@pytest.mark.parametrize(("family", "method"), [(family, method) for family in ("sd", "sdxl", "sd3", "flux")
                                                 for method in ("lora", "full") if (family, method) != ("flux", "full")])
def test_a_trained_run_of_each_family_generates_in_its_own_pipeline(request, tmp_path: Path, family: str,
                                                                     method: str) -> None:
    from hub_fixtures import train_tiny_run
    from tiny_model import tiny_base_of

    tiny_base = tiny_base_of(request, family)

    run = train_tiny_run(tiny_base.path, tmp_path / "run", method=method)
    cache = PipelineCache()
    pipe = cache.get(str(run), "cpu")
    assert type(pipe) is tiny_base.pipeline_class
    request = GenerateRequest("a photo of sks dog", negative_prompt="blurry", seed=3, scheduler="Euler", **SMALL)
    tuned = pixels(generate(pipe, request))[0]
    base = pixels(generate(cache.get(str(tiny_base.path), "cpu"), request))[0]
    assert np.abs(tuned - base).mean() > 1.0, "the trained run draws what its base draws"
    if method == "lora":
        off = GenerateRequest("a photo of sks dog", negative_prompt="blurry", seed=3, scheduler="Euler",
                              lora_scale=0.0, **SMALL)
        np.testing.assert_array_equal(pixels(generate(cache.get(str(run), "cpu"), off))[0], base)


def test_a_lora_of_one_generation_on_a_base_of_another_is_refused(
    lora_run: Path, tiny_sdxl_model_dir: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "sd-lora-on-sdxl"
    shutil.copytree(lora_run, moved)
    config = TrainConfig.load(moved / "config.json")
    config.replace(pretrained_model=str(tiny_sdxl_model_dir)).save(moved / "config.json")
    with pytest.raises(ValueError) as err:
        resolve_model(str(moved))
    message = str(err.value)
    assert "sd-lora-on-sdxl is a LoRA for a model with 32-wide text conditioning" in message
    assert f"its base model {tiny_sdxl_model_dir} is a model with 64-wide text conditioning" in message
