"""Prior preservation from the base model's own predictions, without class images.

The paper keeps the class prior with images the base model drew of the class: the loss on them
pulls the fine-tuned model's prediction towards what the base model would have drawn. The newer
trainers ask the base model directly: each step, the instance rows' noisy latents go through the
model a second time with the class prompt, and the target is what the base model predicts for them
(ai-toolkit's "differential output preservation"). Nothing to generate before the first step, and
the target is the base model itself rather than a hundred samples of it; the cost is a forward pass
of the base model a step, and for a full fine-tune a frozen copy of the denoiser (in the mixed-precision
dtype: `trainer.memory.estimate` counts it). A LoRA's base model is the same denoiser with its adapters switched
off, so it costs no memory.

The class prompt's conditioning for the base model is computed once, when the run is set up and
before a checkpoint is loaded, so the text encoder is still the base model's then, even when it is
trained or the run resumes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from trainer.config import TrainConfig
from trainer.families import Components, Conditioning


@dataclass
class BasePrediction:
    """The targets of the class rows: the base model's prediction for the class prompt."""

    class_ids: torch.Tensor  # the class prompt's token ids, one row
    conditioning: Conditioning  # the base text encoders' conditioning of it, one row
    frozen_denoiser: torch.nn.Module | None  # full fine-tuning: the base denoiser; LoRA: None (adapters off)

    @classmethod
    def create(cls, config: TrainConfig, parts: Components, device: torch.device,
               dtype: torch.dtype) -> BasePrediction | None:
        """Called after the trainable setup (LoRA adapters added, dtypes and device set), before resume."""
        if not config.from_base_prediction:
            return None
        ids = parts.family.tokenize(parts, config.class_prompt)[None].to(device)
        with torch.no_grad(), _adapters_off(parts.text_encoders):
            conditioning = parts.family.encode(parts, ids)
        frozen = None
        if config.method == "full":
            frozen = copy.deepcopy(parts.denoiser).requires_grad_(False).eval()
            if dtype != next(frozen.parameters()).dtype:  # (diffusers warns on any .to(dtype))
                frozen.to(dtype=dtype)
        return cls(ids[0], conditioning, frozen)

    def rows(self, n: int, device: torch.device) -> torch.Tensor:
        """The class prompt's ids for `n` rows, to append to a batch's."""
        return self.class_ids.to(device)[None].expand(n, *self.class_ids.shape)  # SDXL's ids are [2, tokens]

    @torch.no_grad()
    def targets(self, parts: Components, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                image_info: torch.Tensor) -> torch.Tensor:
        """The base model's prediction for the class prompt on these noisy latents. `denoiser` is the
        trained denoiser, unwrapped (its adapters are switched off for this forward)."""
        cond = Conditioning.cat([self.conditioning] * noisy.shape[0])
        if self.frozen_denoiser is not None:
            return parts.family.predict(self.frozen_denoiser, noisy, timesteps, cond, image_info)
        with _adapters_off([denoiser]):
            return parts.family.predict(denoiser, noisy, timesteps, cond, image_info)


@contextlib.contextmanager
def _adapters_off(modules) -> Iterator[None]:
    """Switch the LoRA adapters of these modules off, and on again after (modules without any: nothing)."""
    with_adapters = [m for m in modules if getattr(m, "peft_config", None)]
    for module in with_adapters:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in with_adapters:
            module.enable_adapters()
