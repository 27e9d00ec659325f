"""Stable Diffusion 3 and FLUX.1: rectified-flow transformers (MMDiT) with a T5 text encoder beside CLIP.

Both learn flow matching (trainer/loss.py `FlowMatching`) and are conditioned on CLIP's pooled output
and T5's hidden states. SD 3 has two CLIP encoders (L and G) whose penultimate states, side by side
and zero-padded to T5's width, come before T5's tokens; FLUX has one CLIP (pooled only), takes its
latents as packed 2×2 patches with position ids, and FLUX.1-dev embeds a guidance value.

`train_text_encoder` trains the CLIP encoders only, never T5 (as diffusers' scripts). A prompt's ids
are one row: each tokenizer's ids, one after the other, split again by `encode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, TrainConfig
from trainer.families.base import Components, Conditioning, ModelFamily
from trainer.families.sd import load_part, save_full_pipeline, save_lora_file
from trainer.loss import FlowMatching
from trainer.model_files import TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3

MAX_T5_TOKENS = 512  # what both pipelines accept


def _ids(tokenizer: Any, prompt: str, length: int) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids[0]


class _FlowTransformer(ModelFamily):
    """What SD 3 and FLUX share: a transformer, flow matching, CLIP + T5, the T5 length."""

    denoiser_name = "transformer"
    objective = FlowMatching()
    quantized_blocks = ("transformer_blocks", "single_transformer_blocks")
    default_t5_tokens: int
    writes_kohya_lora = False

    def check_config(self, config: TrainConfig, parts: Components) -> None:
        if config.snr_gamma is not None:
            raise ConfigError(f"`snr_gamma` is a DDPM loss weighting; {self.label} learns flow matching: leave it "
                              "unset and choose `weighting_scheme` instead", field="snr_gamma")
        if (config.max_sequence_length or 0) > MAX_T5_TOKENS:
            raise ConfigError(f"`max_sequence_length` {config.max_sequence_length} is over {MAX_T5_TOKENS}, the most "
                              f"T5 tokens {self.label} takes", field="max_sequence_length")
        step = 2 * parts.vae_scale_factor  # 2x2 latent patches
        if config.resolution % step:
            raise ConfigError(f"`resolution` {config.resolution} must be a multiple of {step} for {self.label} (its "
                              f"transformer takes 2x2 patches of the {parts.vae_scale_factor}x smaller latents)",
                              field="resolution")

    def t5_tokens(self, parts: Components) -> int:
        config = parts.config
        return (config.max_sequence_length if config is not None and config.max_sequence_length
                else self.default_t5_tokens)

    def sampling_scheduler(self, parts: Components) -> Any:
        """A fresh copy of the base's own flow scheduler (sampling changes a scheduler's sigmas; training reads them)."""
        return type(parts.noise_scheduler).from_config(parts.noise_scheduler.config)

    def sampling_kwargs(self, config: TrainConfig) -> dict[str, Any]:
        return {"max_sequence_length": config.max_sequence_length or self.default_t5_tokens}

    def load_pipeline(self, folder: Path, dtype: torch.dtype) -> Any:
        pipe = self.pipeline_class.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self, parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module],
                 scheduler: Any) -> Any:
        pipe = self.pipeline_class(**self._modules(parts, denoiser, text_encoders), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_full(self, source: str, revision: str | None, parts: Components, denoiser: torch.nn.Module,
                  text_encoders: Sequence[torch.nn.Module], run_dir: Path, to_fp32: bool) -> Path:
        return save_full_pipeline(self.pipeline_class, source, revision, self._modules(parts, denoiser, text_encoders),
                                  run_dir, to_fp32)

    def _modules(self, parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]) -> dict:
        """The pipeline's components: the VAE, the transformer, each text encoder and its tokenizer by its name."""
        names = self.text_encoder_names(len(text_encoders))
        tokenizers = (parts.tokenizer, parts.tokenizer_2, parts.tokenizer_3)
        return {"vae": parts.vae, "transformer": denoiser, **dict(zip(names, text_encoders, strict=True)),
                **{name.replace("text_encoder", "tokenizer"): tok for name, tok in zip(names, tokenizers, strict=False)}}

    def save_lora(self, run_dir: Path, layers: dict[str, dict], metadata: dict[str, dict]) -> Path:
        return save_lora_file(self.pipeline_class, run_dir, layers, metadata)

    @staticmethod
    def _load_flow_parts(source: str, revision: str | None, variant: str | None, transformer_class: type,
                         encoders: Sequence[tuple[str, str, type, type]]) -> dict[str, Any]:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        def load(part: str, loader):
            return load_part(source, part, loader, revision, variant)

        schedule = load("scheduler", FlowMatchEulerDiscreteScheduler.load_config)
        found: dict[str, Any] = {}
        for tokenizer_name, encoder_name, tokenizer_class, encoder_class in encoders:
            found[tokenizer_name] = load(tokenizer_name, tokenizer_class.from_pretrained)
            found[encoder_name] = load(encoder_name, encoder_class.from_pretrained)
        found["vae"] = load("vae", AutoencoderKL.from_pretrained)
        found["denoiser"] = load("transformer", transformer_class.from_pretrained)
        found["noise_scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(schedule)
        return found


class StableDiffusion3(_FlowTransformer):
    name = "sd3"
    label = "Stable Diffusion 3"
    pipeline_names = ("StableDiffusion3Pipeline",)
    default_resolution = 1024
    default_t5_tokens = 77  # diffusers' SD 3 DreamBooth script's default
    quantized_text_encoders = (2,)  # T5
    sampling_defaults = {"guidance_scale": 7.0, "steps": 28, "dtype": "bfloat16", "negative": True, "sampler": False}
    card_tags = ("sd3", "sd3-diffusers")
    denoiser_lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                             "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out")

    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load_components(self, source: str, revision: str | None, variant: str | None) -> Components:
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        found = self._load_flow_parts(source, revision, variant, SD3Transformer2DModel, (
            ("tokenizer", TEXT_ENCODER, CLIPTokenizer, CLIPTextModelWithProjection),
            ("tokenizer_2", TEXT_ENCODER_2, CLIPTokenizer, CLIPTextModelWithProjection),
            ("tokenizer_3", TEXT_ENCODER_3, T5TokenizerFast, T5EncoderModel),
        ))
        return Components(family=self, **found)

    def tokenize(self, parts: Components, prompt: str) -> torch.Tensor:
        """CLIP-L's, CLIP-G's and T5's ids, one after the other."""
        return torch.cat([
            _ids(parts.tokenizer, prompt, parts.tokenizer.model_max_length),
            _ids(parts.tokenizer_2, prompt, parts.tokenizer_2.model_max_length),
            _ids(parts.tokenizer_3, prompt, self.t5_tokens(parts)),
        ])

    def encode(self, parts: Components, input_ids: torch.Tensor,
               text_encoders: Sequence[torch.nn.Module] | None = None) -> Conditioning:
        """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states side by side, padded to T5's
        width, then T5's states; the pooled output is both CLIPs' projections side by side."""
        clip_l, clip_g, t5 = list(text_encoders) if text_encoders else parts.text_encoders
        n_l, n_g = parts.tokenizer.model_max_length, parts.tokenizer_2.model_max_length
        hidden, pooled = [], []
        for encoder, ids in ((clip_l, input_ids[:, :n_l]), (clip_g, input_ids[:, n_l:n_l + n_g])):
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        t5_states = t5(input_ids[:, n_l + n_g:])[0]
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5_states.to(clip.dtype)], dim=-2),
                            {"pooled": torch.cat(pooled, dim=-1)})

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, image_info: torch.Tensor) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond.hidden_states,
                        pooled_projections=cond.added["pooled"], return_dict=False)[0]


# FLUX.1 [dev]'s full fine-tune, from diffusers' DreamBooth README and SimpleTuner's notes: the 12 B
# transformer's bf16 weights, gradients and AdamW states.
FLUX_FULL_GB = 120


class Flux(_FlowTransformer):
    name = "flux"
    label = "FLUX.1"
    pipeline_names = ("FluxPipeline",)
    default_resolution = 1024
    default_t5_tokens = 512
    card_tags = ("flux", "flux-diffusers")
    # FLUX.1-dev embeds guidance 3.5 and takes no negative prompt (FLUX.1-schnell: 4 steps, guidance 0).
    sampling_defaults = {"guidance_scale": 3.5, "steps": 28, "dtype": "bfloat16", "negative": False, "sampler": False}
    trainable_text_encoders = 1  # CLIP; T5 never trains
    quantized_text_encoders = (1,)  # T5
    # diffusers' train_dreambooth_lora_flux.py's default target modules.
    denoiser_lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                             "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    @property
    def pipeline_class(self) -> type:
        from diffusers import FluxPipeline

        return FluxPipeline

    def check_config(self, config: TrainConfig, parts: Components) -> None:
        super().check_config(config, parts)
        if config.method == "full":
            raise ConfigError(
                f"`method` full: fine-tuning all of FLUX.1's transformer needs about {FLUX_FULL_GB} GB of GPU "
                "memory (its weights, gradients and optimizer states), more than one card holds; train a LoRA "
                "(method lora), which fits 12-16 GB with a 4-bit base", field="method")

    def native_resolution(self, parts: Components) -> int:
        return self.default_resolution  # the transformer's config has no sample size: FLUX.1 trained at 1024

    def latent_channels(self, parts: Components) -> int:
        return int(parts.denoiser.config.in_channels) // 4  # it takes 2x2 patches of the latents, packed

    def load_components(self, source: str, revision: str | None, variant: str | None) -> Components:
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        found = self._load_flow_parts(source, revision, variant, FluxTransformer2DModel, (
            ("tokenizer", TEXT_ENCODER, CLIPTokenizer, CLIPTextModel),
            ("tokenizer_2", TEXT_ENCODER_2, T5TokenizerFast, T5EncoderModel),
        ))
        return Components(family=self, **found)

    def tokenize(self, parts: Components, prompt: str) -> torch.Tensor:
        """CLIP's ids, then T5's."""
        return torch.cat([_ids(parts.tokenizer, prompt, parts.tokenizer.model_max_length),
                          _ids(parts.tokenizer_2, prompt, self.t5_tokens(parts))])

    def encode(self, parts: Components, input_ids: torch.Tensor,
               text_encoders: Sequence[torch.nn.Module] | None = None) -> Conditioning:
        """As FluxPipeline.encode_prompt: CLIP's pooled output and T5's hidden states; with them the guidance
        value the transformer is trained at (FLUX.1-dev embeds it)."""
        clip, t5 = list(text_encoders) if text_encoders else parts.text_encoders
        n = parts.tokenizer.model_max_length
        pooled = clip(input_ids[:, :n], output_hidden_states=False).pooler_output
        states = t5(input_ids[:, n:], output_hidden_states=False)[0]
        config = parts.config
        guidance = torch.full((input_ids.shape[0],), config.guidance if config is not None else 1.0,
                              device=input_ids.device, dtype=torch.float32)
        return Conditioning(states, {"pooled": pooled, "guidance": guidance})

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, image_info: torch.Tensor) -> torch.Tensor:
        """The latents packed into 2x2 patches with their position ids (as FluxPipeline does), the timestep
        in [0, 1], and unpacked again."""
        pipeline = self.pipeline_class
        rows, channels, height, width = noisy.shape
        packed = pipeline._pack_latents(noisy, rows, channels, height, width)
        image_ids = pipeline._prepare_latent_image_ids(rows, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(cond.hidden_states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = cond.added["guidance"] if denoiser.config.guidance_embeds else None
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=cond.added["pooled"], encoder_hidden_states=cond.hidden_states,
                       txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        # _unpack_latents takes the image size in pixels and the VAE's factor: the latent size with factor 1.
        return pipeline._unpack_latents(out, height, width, 1)
