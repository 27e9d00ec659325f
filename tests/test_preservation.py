"""Prior preservation from the base model's own predictions (trainer/preservation/base_prediction.py), on the tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from train_helpers import denoising_loss, tiny_config

from trainer import train
from trainer.config import ConfigError, TrainConfig

CLASS_PROMPT = "a photo of a square"


@torch.no_grad()
def class_prompt_drift(model_dir: Path, lora_dir: Path, draws: int = 48) -> float:
    """Mean squared difference between the LoRA'd and the base UNet's predictions for the class prompt,
    on fixed random latents and timesteps (not the training photos)."""
    from trainer.families import Components, detect_family
    from trainer.run_folder import load_pipeline

    base = load_pipeline(model_dir, torch.float32)
    tuned = load_pipeline(model_dir, torch.float32, lora_dir=lora_dir)
    family = detect_family(str(model_dir))
    parts = Components(family, base.tokenizer, base.text_encoder, base.vae, base.unet, base.scheduler)
    cond = family.encode(parts, family.tokenize(parts, CLASS_PROMPT)[None].expand(draws, -1))
    gen = torch.Generator().manual_seed(7)
    channels, size = base.unet.config.in_channels, base.unet.config.sample_size
    latents = torch.randn((draws, channels, size, size), generator=gen)
    t = torch.randint(0, base.scheduler.config.num_train_timesteps, (draws,), generator=gen)
    info = torch.zeros((draws, 6))
    return torch.nn.functional.mse_loss(family.predict(tuned.unet, latents, t, cond, info),
                                        family.predict(base.unet, latents, t, cond, info)).item()


@pytest.mark.slow
def test_base_prediction_keeps_a_loras_class_output_nearer_the_base_than_no_preservation(
        tiny_model_dir, subject_images, tmp_path):
    common = dict(max_train_steps=30, learning_rate=3e-3, class_prompt=CLASS_PROMPT, use_8bit_adam=False)
    runs = {}
    for name, changes in {"none": dict(with_prior_preservation=False),
                          "base": dict(with_prior_preservation=True, preservation="base-prediction")}.items():
        config = tiny_config(tiny_model_dir, subject_images, tmp_path / name, **common, **changes,
                             class_cache_dir=str(tmp_path / "cache"))
        assert train(config).status == "completed"
        runs[name] = Path(config.output_dir)
    assert not (tmp_path / "cache").exists()  # no class image was made
    drift = {name: class_prompt_drift(tiny_model_dir, run) for name, run in runs.items()}
    assert drift["base"] < 0.75 * drift["none"], drift  # measured: 0.033 vs 0.060
    # And the subject was learned all the same (the adapters were on again after each base prediction).
    before = denoising_loss(tiny_model_dir, subject_images, "a photo of sks square")
    after = denoising_loss(tiny_model_dir, subject_images, "a photo of sks square", lora_dir=runs["base"])
    assert after < 0.9 * before, (before, after)


def test_full_fine_tuning_trains_against_a_frozen_copy_that_the_memory_model_counts(
        tiny_model_dir, subject_images, tmp_path):
    from train_helpers import safetensors_dir

    from trainer.memory.estimate import FROZEN_UNET, estimate, frozen_part_bytes
    from trainer.memory.shapes import read_shapes

    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", method="full", max_train_steps=3,
                         with_prior_preservation=True, preservation="base-prediction", class_prompt=CLASS_PROMPT,
                         use_8bit_adam=False, cache_latents=False)
    result = train(config)
    assert result.status == "completed" and result.step == 3
    tuned = safetensors_dir(Path(config.output_dir) / "unet")
    base = safetensors_dir(tiny_model_dir / "unet")
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # the trained UNet moved

    shapes = read_shapes(str(tiny_model_dir), None, None, local_only=True)
    with_copy = estimate(config, "cpu", shapes=shapes)
    without = estimate(config.replace(preservation="class-images"), "cpu", shapes=shapes)
    assert with_copy.weights_by_part[FROZEN_UNET] == frozen_part_bytes(shapes, "unet", "no") > 0
    assert with_copy.weights - without.weights == with_copy.weights_by_part[FROZEN_UNET]
    assert with_copy.class_generation == 0 and FROZEN_UNET not in without.weights_by_part


@pytest.mark.parametrize(("flag", "prior", "kind"), [("base-prediction", True, "base-prediction"),
                                                     ("class-images", True, "class-images"),
                                                     ("none", False, "class-images")])
def test_the_cli_names_the_preservation(tiny_model_dir, subject_images, tmp_path, flag, prior, kind):
    run = tmp_path / "run"
    status, stderr = run_cli(["train", "--pretrained-model", str(tiny_model_dir), "--instance-data",
                              str(subject_images), "--output-dir", str(run), "--instance-prompt",
                              "a photo of sks square", "--class-prompt", CLASS_PROMPT, "--preservation", flag,
                              "--resolution", "32", "--max-train-steps", "1", "--report-to", "none",
                              "--num-class-images", "2", "--class-inference-steps", "1",
                              "--class-cache-dir", str(tmp_path / "cache"), "--no-gradient-checkpointing"])
    assert status == 0, stderr[-3000:]
    saved = TrainConfig.load(run / "config.json")
    assert (saved.with_prior_preservation, saved.preservation) == (prior, kind)
    assert (tmp_path / "cache").exists() == (flag == "class-images")


def test_an_unknown_preservation_is_refused(tiny_model_dir, subject_images, tmp_path):
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", preservation="frozen")
    with pytest.raises(ConfigError, match="`preservation` must be one of class-images, base-prediction"):
        config.validate()
