"""The model-family interface, and the loaded parts of a base model that it works on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from trainer.config import TrainConfig, UserError
from trainer.loss import Denoising, FlowMatching
from trainer.model_files import text_encoder_names


class ModelLoadError(UserError, RuntimeError):
    """The base model could not be loaded; the message names the model and the part."""


def first_line(err: BaseException) -> str:
    """The first line of a library's error (from_pretrained's run to paragraphs), or its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class Components:
    """The loaded parts of a base model. The denoiser is a UNet (SD 1.x/2.x, SDXL) or a transformer
    (SD 3, FLUX); SDXL and FLUX have a second tokenizer and text encoder, SD 3 a third."""

    family: ModelFamily
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    denoiser: torch.nn.Module
    noise_scheduler: Any  # the training noise schedule: DDPMScheduler, FlowMatchEulerDiscreteScheduler
    tokenizer_2: Any = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_3: Any = None
    text_encoder_3: torch.nn.Module | None = None
    config: TrainConfig | None = None  # the run's settings the family reads (FLUX's guidance, the T5 length)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [te for te in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if te is not None]

    @property
    def trainable_text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders `train_text_encoder` trains: the CLIP ones (never T5)."""
        return self.text_encoders[: self.family.trainable_text_encoders]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts: the text encoder's hidden states,
    plus any further tensors a family passes (SDXL: pooled text embeddings and time ids)."""

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(rows: Sequence[Conditioning]) -> Conditioning:
        return Conditioning(
            torch.cat([r.hidden_states for r in rows]),
            {key: torch.cat([r.added[key] for r in rows]) for key in rows[0].added},
        )


class ModelFamily:
    """One kind of base model. Subclasses fill the class attributes and the methods."""

    name: ClassVar[str]  # short id, recorded in the run folder's run.json
    label: ClassVar[str]  # for people: "Stable Diffusion 1.x/2.x"
    pipeline_names: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s of this family
    default_resolution: ClassVar[int]
    denoiser_name: ClassVar[str] = "unet"  # the pipeline's component: unet, transformer
    objective: ClassVar[Denoising | FlowMatching] = Denoising()  # what a training step asks of the denoiser
    # The attention projections of diffusers' UNet2DConditionModel and of transformers' CLIP encoders.
    denoiser_lora_targets: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    text_lora_targets: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    trainable_text_encoders: ClassVar[int] = 2  # the first N text encoders may train (the CLIP ones)
    # The denoiser's children whose linear layers `quantize_base` quantizes (trainer/quantize.py).
    quantized_blocks: ClassVar[tuple[str, ...]] = ("down_blocks", "mid_block", "up_blocks")
    # The text encoders (by index) `quantize_base` also quantizes: the frozen T5 of SD 3 and FLUX, which would
    # otherwise hold 9.5 GB in bf16 beside the denoiser while the prompts are embedded.
    quantized_text_encoders: ClassVar[tuple[int, ...]] = ()
    writes_kohya_lora: ClassVar[bool] = True
    # How its pipeline samples best: the card's snippet and Generate's defaults (`negative`: it takes a
    # negative prompt; `sampler`: any of Generate's samplers, else its own scheduler).
    sampling_defaults: ClassVar[dict[str, Any]] = {"guidance_scale": 7.5, "steps": 25, "dtype": "float16",
                                                   "negative": True, "sampler": True}  # also a LoRA file in kohya's layout (trainer/output.py)
    card_tags: ClassVar[tuple[str, ...]]
    # diffusers' kohya converter names the text encoders lora_te1_, lora_te2_; what this family's
    # A1111/ComfyUI/kohya files call them instead, where that differs.
    kohya_prefixes: ClassVar[dict[str, str]] = {}

    # --- the pipeline ---------------------------------------------------------------------
    @property
    def pipeline_class(self) -> type:
        raise NotImplementedError

    def load_components(self, source: str, revision: str | None, variant: str | None) -> Components:
        raise NotImplementedError

    def check_config(self, config: TrainConfig, parts: Components) -> None:
        """Raise ConfigError for settings this family cannot train well (checked before training)."""

    def native_resolution(self, parts: Components) -> int:
        """The image size the base model was trained at: the denoiser's sample size in pixels."""
        return int(parts.denoiser.config.sample_size) * parts.vae_scale_factor

    def latent_channels(self, parts: Components) -> int:
        """The channels of the VAE latents the denoiser takes."""
        return int(parts.denoiser.config.in_channels)

    def sampling_scheduler(self, parts: Components) -> Any:
        """The scheduler samples and class images are drawn with: a fast multistep solver on the training
        schedule's config."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config)

    def sampling_kwargs(self, config: TrainConfig) -> dict[str, Any]:
        """Further pipeline arguments for samples, class images and scores (FLUX/SD 3: the T5 length)."""
        return {}

    def pipeline(self, parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                 scheduler: Any) -> Any:
        """An inference pipeline over the in-memory modules (no copy); `text_encoders` as in parts."""
        raise NotImplementedError

    def load_pipeline(self, folder: Path, dtype: torch.dtype) -> Any:
        """A saved pipeline folder, safetensors only, no remote code."""
        raise NotImplementedError

    # --- prompts --------------------------------------------------------------------------
    def tokenize(self, parts: Components, prompt: str) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, parts: Components, input_ids: torch.Tensor,
               text_encoders: Sequence[torch.nn.Module] | None = None) -> Conditioning:
        """Conditioning for a batch of token ids; `text_encoders` are the (maybe trained) modules to
        use, in the order of `parts.text_encoders` (default: those)."""
        raise NotImplementedError

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, image_info: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction. `image_info` holds each row's (original height, original width, crop
        top, crop left, target height, target width), for families conditioned on them (SDXL)."""
        return denoiser(noisy, timesteps, cond.hidden_states).sample

    # --- weights --------------------------------------------------------------------------
    def save_full(self, source: str, revision: str | None, parts: Components, denoiser: torch.nn.Module,
                  text_encoders: Sequence[torch.nn.Module], run_dir: Path, to_fp32: bool) -> Path:
        raise NotImplementedError

    def save_lora(self, run_dir: Path, layers: dict[str, dict], metadata: dict[str, dict]) -> Path:
        """`layers`/`metadata` keyed by the pipeline's names: the denoiser's ("unet", "transformer"),
        "text_encoder" (and "text_encoder_2"); returns the file."""
        raise NotImplementedError

    @staticmethod
    def text_encoder_names(count: int) -> list[str]:
        """diffusers' names of the text encoders: text_encoder, text_encoder_2 (trainer/model_files.py)."""
        return text_encoder_names(count)
