"""Validation samples during training, and the run folder's final weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from .card import LORA_WEIGHTS
from .config import TrainConfig
from .models import Components


def pipeline_from_parts(parts: Components, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> StableDiffusionPipeline:
    """An inference pipeline over the in-memory modules (no copy), with a fast multistep sampler."""
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_samples(
    config: TrainConfig,
    parts: Components,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    step: int,
    folder: Path,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> list[Path]:
    """One image per (prompt, index) with seed `config.seed + index`: comparable across steps."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_from_parts(parts, unet, text_encoder)
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    paths = []
    try:
        for p, prompt in enumerate(config.validation_prompts):
            for i in range(config.num_validation_images):
                generator = torch.Generator(device="cpu").manual_seed(config.seed + i)
                with torch.no_grad(), autocast():
                    image = pipe(
                        prompt,
                        num_inference_steps=config.validation_inference_steps,
                        guidance_scale=config.validation_guidance_scale,
                        height=config.resolution,
                        width=config.resolution,
                        generator=generator,
                    ).images[0]
                path = folder / f"step-{step:06d}-p{p}-{i}.png"
                image.save(path)
                paths.append(path)
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    return paths


def save_weights(config: TrainConfig, parts: Components, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                 run_dir: Path) -> Path:
    """Full: a pipeline folder plain `from_pretrained` loads. LoRA: the diffusers LoRA file."""
    if config.method == "lora":
        return _save_lora(config, unet, text_encoder, run_dir)
    # The base pipeline's own scheduler class and config (not the DDPM used for training).
    pipe = StableDiffusionPipeline.from_pretrained(
        config.pretrained_model,
        revision=config.revision,
        use_safetensors=True,
        vae=parts.vae,
        text_encoder=text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # fp32 on disk whatever the training dtype: loaders cast down, but cannot recover precision.
    if config.mixed_precision != "no":
        pipe.to(dtype=torch.float32)
    pipe.save_pretrained(run_dir, safe_serialization=True)
    return run_dir / "model_index.json"


def _save_lora(config: TrainConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module, run_dir: Path) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def lora_state(model: torch.nn.Module) -> dict:
        # No embedding layers are trained; "auto" would ask the Hub whether the base model's
        # vocabulary changed (a network call, and a warning, at every save of the text encoder).
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))

    kwargs = {
        "unet_lora_layers": lora_state(unet),
        "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    if config.train_text_encoder:
        kwargs["text_encoder_lora_layers"] = lora_state(text_encoder)
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(run_dir, safe_serialization=True, **kwargs)
    return run_dir / LORA_WEIGHTS
