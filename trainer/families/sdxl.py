"""Stable Diffusion XL: two CLIP text encoders (the second's pooled, projected output conditions the
UNet too) and micro-conditioning on each image's original size, crop and target size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, TrainConfig
from trainer.families.base import Components, Conditioning, ModelFamily
from trainer.families.sd import load_clip_unet_parts, save_full_pipeline, save_lora_file
from trainer.model_files import TEXT_ENCODER, TEXT_ENCODER_2

# No invisible watermark on training samples and generated images (it needs an extra package, too).
_NO_WATERMARK: dict[str, Any] = {"add_watermarker": False}


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    label = "Stable Diffusion XL"
    pipeline_names = ("StableDiffusionXLPipeline",)
    default_resolution = 1024
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load_components(self, source: str, revision: str | None, variant: str | None) -> Components:
        return load_clip_unet_parts(self, source, revision, variant, second_encoder=True)

    def check_config(self, config: TrainConfig, parts: Components) -> None:
        native = self.native_resolution(parts)
        if config.resolution < native // 2:
            raise ConfigError(
                f"`resolution` {config.resolution} is under {native // 2}, half of this SDXL model's native "
                f"{native} px: SDXL loses the subject's detail and its composition below that. Use {native // 2} "
                f"or more ({native} is best)."
            )

    def pipeline(self, parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                 scheduler: Any) -> Any:
        pipe = self.pipeline_class(**self._modules(parts, denoiser, text_encoders), scheduler=scheduler, **_NO_WATERMARK)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_pipeline(self, folder: Path, dtype: torch.dtype) -> Any:
        pipe = self.pipeline_class.from_pretrained(folder, dtype=dtype, use_safetensors=True, **_NO_WATERMARK)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def tokenize(self, parts: Components, prompt: str) -> torch.Tensor:
        """Both tokenizers' ids, stacked: [2, max_length]."""
        rows = [
            tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids[0]
            for tok in (parts.tokenizer, parts.tokenizer_2)
        ]
        return torch.stack(rows)

    def encode(self, parts: Components, input_ids: torch.Tensor,
               text_encoders: Sequence[torch.nn.Module] | None = None) -> Conditioning:
        """As StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states side by
        side, and the second encoder's pooled, projected output."""
        encoders = list(text_encoders) if text_encoders else parts.text_encoders
        hidden = []
        pooled = None
        for i, encoder in enumerate(encoders):
            out = encoder(input_ids[:, i], output_hidden_states=True)
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            hidden.append(out.hidden_states[-2])
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled})

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, image_info: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": cond.added["text_embeds"], "time_ids": image_info.to(cond.hidden_states.dtype)}
        return denoiser(noisy, timesteps, cond.hidden_states, added_cond_kwargs=added).sample

    def save_full(self, source: str, revision: str | None, parts: Components, denoiser: torch.nn.Module,
                  text_encoders: Sequence[torch.nn.Module], run_dir: Path, to_fp32: bool) -> Path:
        return save_full_pipeline(self.pipeline_class, source, revision,
                                  {**self._modules(parts, denoiser, text_encoders), **_NO_WATERMARK}, run_dir, to_fp32)

    @staticmethod
    def _modules(parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]) -> dict:
        return {"vae": parts.vae, TEXT_ENCODER: text_encoders[0], TEXT_ENCODER_2: text_encoders[1],
                "tokenizer": parts.tokenizer, "tokenizer_2": parts.tokenizer_2, "unet": denoiser}

    def save_lora(self, run_dir: Path, layers: dict[str, dict], metadata: dict[str, dict]) -> Path:
        return save_lora_file(self.pipeline_class, run_dir, layers, metadata)
