"""Validation samples during training, and the run folder's final weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

from .config import TrainConfig
from .families import Components
from .run_folder import sample_path, samples_dir


def pipeline_from_parts(parts: Components, unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]):
    """The family's inference pipeline over the in-memory modules (no copy), with a fast multistep sampler."""
    scheduler = DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config)
    return parts.family.pipeline(parts, unet, text_encoders, scheduler)


def make_samples(
    config: TrainConfig,
    parts: Components,
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    step: int,
    run_dir: Path,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> list[Path]:
    """One image per (prompt, index) with seed `config.seed + index`: comparable across steps."""
    samples_dir(run_dir).mkdir(parents=True, exist_ok=True)
    pipe = pipeline_from_parts(parts, unet, text_encoders)
    modules = [unet, *text_encoders]
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
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
                path = sample_path(run_dir, step, p, i)
                image.save(path)
                paths.append(path)
    finally:
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)
    return paths


def save_weights(config: TrainConfig, parts: Components, unet: torch.nn.Module,
                 text_encoders: Sequence[torch.nn.Module], run_dir: Path) -> Path:
    """Full: a pipeline folder plain `from_pretrained` loads. LoRA: the diffusers LoRA file."""
    if config.method == "lora":
        return _save_lora(config, parts, unet, text_encoders, run_dir)
    return parts.family.save_full(config.pretrained_model, config.revision, parts, unet, text_encoders, run_dir,
                                  to_fp32=config.mixed_precision != "no")


def _save_lora(config: TrainConfig, parts: Components, unet: torch.nn.Module,
               text_encoders: Sequence[torch.nn.Module], run_dir: Path) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def lora_state(model: torch.nn.Module) -> dict:
        # No embedding layers are trained; "auto" would ask the Hub whether the base model's
        # vocabulary changed (a network call, and a warning, at every save of the text encoder).
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))

    trained = {"unet": unet}
    if config.train_text_encoder:
        trained.update(zip(parts.family.text_encoder_names(len(text_encoders)), text_encoders, strict=True))
    layers = {part: lora_state(model) for part, model in trained.items()}
    metadata = {part: model.peft_config["default"].to_dict() for part, model in trained.items()}
    return parts.family.save_lora(run_dir, layers, metadata)
