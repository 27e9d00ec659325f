"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, epsilon or v-prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError
from trainer.families.base import Components, Conditioning, ModelFamily, ModelLoadError, first_line
from trainer.model_files import LORA_WEIGHTS, PIPELINE_INDEX, TEXT_ENCODER, TEXT_ENCODER_2


def save_lora_file(pipeline_class: type, run_dir: Path, layers: dict[str, dict], metadata: dict[str, dict]) -> Path:
    """The diffusers LoRA file, through the pipeline class's own save_lora_weights."""
    kwargs: dict[str, Any] = {}
    for part, state in layers.items():
        kwargs[f"{part}_lora_layers"] = state
        kwargs[f"{part}_lora_adapter_metadata"] = metadata[part]
    pipeline_class.save_lora_weights(run_dir, safe_serialization=True, **kwargs)
    return run_dir / LORA_WEIGHTS


def load_clip_unet_parts(family: ModelFamily, source: str, revision: str | None, variant: str | None,
                         second_encoder: bool = False) -> Components:
    """A CLIP text encoder (and, for SDXL, a second one with projection), a VAE, a UNet and the
    training noise schedule, each through `from_pretrained`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load(part: str, loader):
        return load_part(source, part, loader, revision, variant)

    schedule = load("scheduler", DDPMScheduler.load_config)  # first: a few bytes, read before the weights
    check_noise_schedule(source, schedule)
    second = {}
    if second_encoder:
        second = {"tokenizer_2": load("tokenizer_2", CLIPTokenizer.from_pretrained),
                  TEXT_ENCODER_2: load(TEXT_ENCODER_2, CLIPTextModelWithProjection.from_pretrained)}
    return Components(
        family=family,
        tokenizer=load("tokenizer", CLIPTokenizer.from_pretrained),
        text_encoder=load(TEXT_ENCODER, CLIPTextModel.from_pretrained),
        vae=load("vae", AutoencoderKL.from_pretrained),
        denoiser=load("unet", UNet2DConditionModel.from_pretrained),
        noise_scheduler=DDPMScheduler.from_config(schedule),
        **second,
    )


def save_full_pipeline(pipeline_class: type, source: str, revision: str | None, modules: dict[str, Any],
                       run_dir: Path, to_fp32: bool) -> Path:
    """The base pipeline with the trained modules in place, saved as a complete pipeline folder: the
    base's own scheduler class and config (not the DDPM used for training) and its other parts."""
    pipe = pipeline_class.from_pretrained(source, revision=revision, use_safetensors=True, **modules)
    # fp32 on disk whatever the training dtype: loaders cast down, but cannot recover precision.
    if to_fp32:
        pipe.to(dtype=torch.float32)
    pipe.save_pretrained(run_dir, safe_serialization=True)
    return run_dir / PIPELINE_INDEX


def check_noise_schedule(source: str, schedule: dict[str, Any]) -> None:
    """Refuse a base made for EDM's noise parametrisation (Playground v2.5, CosXL: an EDM scheduler, with
    `sigma_data`): the DDPM noise this engine trains with would fit it to the wrong target, silently."""
    name = str(schedule.get("_class_name", ""))
    if name.startswith("EDM") or "sigma_data" in schedule:
        raise ConfigError(
            f"`pretrained_model`: {source} is an EDM-style model (its scheduler is {name or 'an EDM one'}, as "
            "Playground v2.5's and CosXL's are); DreamBooth Studio trains with DDPM noise only, which would fit "
            "this model to the wrong target. Train from a Stable Diffusion 1.x/2.x or SDXL base with a DDPM-style "
            "scheduler.",
            field="pretrained_model",
        )


def load_part(source: str, part: str, loader, revision: str | None, variant: str | None):
    """One component through `from_pretrained`, so a Hub id and a local folder take one path."""
    variant_note = f" (variant {variant})" if variant else ""
    if Path(source).is_dir() and not (Path(source) / part).is_dir():
        # Said here: a missing tokenizer folder makes transformers fail with an OverflowError.
        raise ModelLoadError(f"`pretrained_model`: could not load the {part} of {source!r}: it has no {part}/ folder")
    try:
        if part in ("tokenizer", "scheduler"):
            return loader(source, subfolder=part, revision=revision)
        return loader(source, subfolder=part, variant=variant, revision=revision, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: weights of other shapes than the config
        # from_pretrained's own messages are long; keep the first line and name the part.
        raise ModelLoadError(f"`pretrained_model`: could not load the {part} of {source!r}{variant_note}: {first_line(err)}") from None


# The generated images are the user's own; the safety checker would also cost a second model.
_NO_SAFETY_CHECKER: dict[str, Any] = {"safety_checker": None, "feature_extractor": None,
                                      "requires_safety_checker": False}


class StableDiffusion(ModelFamily):
    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_names = ("StableDiffusionPipeline",)
    default_resolution = 512
    card_tags = ("stable-diffusion",)
    kohya_prefixes = {"lora_te1_": "lora_te_"}  # SD 1.x/2.x files have a single lora_te_

    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load_components(self, source: str, revision: str | None, variant: str | None) -> Components:
        return load_clip_unet_parts(self, source, revision, variant)

    def pipeline(self, parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                 scheduler: Any) -> Any:
        pipe = self.pipeline_class(
            vae=parts.vae,
            text_encoder=text_encoders[0],
            tokenizer=parts.tokenizer,
            unet=denoiser,
            scheduler=scheduler,
            **_NO_SAFETY_CHECKER,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_pipeline(self, folder: Path, dtype: torch.dtype) -> Any:
        pipe = self.pipeline_class.from_pretrained(
            folder,
            dtype=dtype,
            use_safetensors=True,
            **_NO_SAFETY_CHECKER,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def tokenize(self, parts: Components, prompt: str) -> torch.Tensor:
        tok = parts.tokenizer
        return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids[0]

    def encode(self, parts: Components, input_ids: torch.Tensor,
               text_encoders: Sequence[torch.nn.Module] | None = None) -> Conditioning:
        encoder = text_encoders[0] if text_encoders else parts.text_encoder
        return Conditioning(encoder(input_ids)[0])

    def save_full(self, source: str, revision: str | None, parts: Components, denoiser: torch.nn.Module,
                  text_encoders: Sequence[torch.nn.Module], run_dir: Path, to_fp32: bool) -> Path:
        modules = {"vae": parts.vae, TEXT_ENCODER: text_encoders[0], "tokenizer": parts.tokenizer, "unet": denoiser}
        return save_full_pipeline(self.pipeline_class, source, revision, {**modules, **_NO_SAFETY_CHECKER},
                                  run_dir, to_fp32)

    def save_lora(self, run_dir: Path, layers: dict[str, dict], metadata: dict[str, dict]) -> Path:
        return save_lora_file(self.pipeline_class, run_dir, layers, metadata)
