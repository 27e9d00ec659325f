"""A tiny, randomly initialised Stable Diffusion with the same classes and layout as SD 1.5.

It trains and samples in seconds on a CPU, needs no network, and is saved exactly like a real
base model (`model_index.json` + one folder per component, safetensors only), so everything that
loads SD 1.5 loads it too. The tests build it once per session (conftest's `tiny_model_dir`).
Its images are noise-like: it checks the plumbing, not the art. (The app's offline model is the
pretrained *toy* model of trainer.toyworld, not this one.)

The only asset it needs is the real CLIP tokenizer in `trainer/assets/clip-tokenizer`, written by
`python tools/build_clip_tokenizer.py`, so prompts tokenize to the ids SD 1.5 sees.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from trainer.toyworld import CLIP_TOKENIZER_DIR as TOKENIZER_DIR

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")

# Width 32 with 8 groups keeps every GroupNorm valid; two blocks give the VAE a 2x downsampling,
# so a 32x32 image is a 16x16 latent, which is the UNet's sample_size.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,  # = the text encoder's hidden_size
    "attention_head_dim": 4,  # diffusers reads this as the number of heads, as in SD 1.5's config
    "norm_num_groups": 8,
}
VAE_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "latent_channels": 4,
    "norm_num_groups": 8,
}
# The full 49,408-token vocabulary is most of the folder's size (49408 x 32 floats), but it lets the
# real tokenizer's ids, placeholder tokens included, index the embedding unchanged.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",  # as OpenAI's CLIP ViT-L/14 used by SD 1.5
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,  # the pooled output is read at the first EOS of each prompt
    "pad_token_id": 1,  # SD 1.5's value; CLIPTextModel never reads it
}
# SD 1.5's scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


# The tiny SDXL: two text encoders side by side (32 + 32 = the UNet's 64-wide cross-attention), the
# second with a projection whose pooled output, with the six time ids (8 sinusoids each), is the
# UNet's added "text_time" embedding: 6 * 8 + 32 = 80 inputs.
SDXL_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}
SDXL_VAE_CONFIG: dict[str, Any] = {**VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {**TEXT_ENCODER_CONFIG, "projection_dim": 32}
# SDXL base 1.0's scheduler/scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@dataclass(frozen=True)
class TinyBase:
    """A built tiny base model and what tests need to know of its family."""

    path: Path
    family: str  # "sd", "sdxl", "sd3" or "flux", as trainer.families names them
    text_encoders: tuple[str, ...]  # the pipeline folder's text-encoder subfolders
    trainable: tuple[str, ...]  # those that `train_text_encoder` trains (the CLIP ones, never T5)

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, PIPELINES[self.family])

    @property
    def denoiser(self) -> str:
        """The pipeline folder's denoiser subfolder."""
        return "unet" if self.family in ("sd", "sdxl") else "transformer"


def tiny_base_of(request, family: str) -> TinyBase:
    """The tiny base model of `family`, from the session's fixtures (conftest.py) that build them."""
    te = ("text_encoder", "text_encoder_2", "text_encoder_3")
    folder, encoders, trainable = {"sd": ("tiny_model_dir", 1, 1), "sdxl": ("tiny_sdxl_model_dir", 2, 2),
                                   "sd3": ("tiny_sd3_model_dir", 3, 2), "flux": ("tiny_flux_model_dir", 2, 1)}[family]
    return TinyBase(request.getfixturevalue(folder), family, te[:encoders], te[:trainable])


PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}


def _check_tokenizer() -> None:
    if not (TOKENIZER_DIR / "vocab.json").is_file():
        raise FileNotFoundError(
            f"The CLIP tokenizer is missing from {TOKENIZER_DIR}: run `python tools/build_clip_tokenizer.py`."
        )


def _seeded(seed: int, make):
    """Re-seed before each component, so changing one component's config leaves the others' weights alone."""
    torch.manual_seed(seed)
    return make()


def _save(pipeline, out_dir: Path, tokenizers: tuple[str, ...]) -> Path:
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    # Ship the tokenizer as SD 1.5 does (vocab.json + merges.txt) instead of the tokenizer.json that
    # save_pretrained writes: 1.5 MB instead of 3.6 MB, and it loads faster. Same ids either way.
    for name in tokenizers:
        shutil.rmtree(out_dir / name)
        shutil.copytree(TOKENIZER_DIR, out_dir / name)
    return out_dir


def build_tiny_sdxl_pipeline(out_dir: Path, seed: int = 0) -> Path:
    """A tiny SDXL base model (StableDiffusionXLPipeline), saved like the real one; seeded."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    _check_tokenizer()
    pipeline = StableDiffusionXLPipeline(
        vae=_seeded(seed, lambda: AutoencoderKL(**SDXL_VAE_CONFIG)),
        text_encoder=_seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))),
        text_encoder_2=_seeded(seed + 1, lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG))),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=_seeded(seed, lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG)),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    return _save(pipeline, Path(out_dir), ("tokenizer", "tokenizer_2"))


def build_tiny_pipeline(out_dir: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build, save (safetensors) and return `out_dir`; the same seed gives the same weights."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` has to be one of {PREDICTION_TYPES} but is {prediction_type!r}.")
    _check_tokenizer()
    out_dir = Path(out_dir)

    pipeline = StableDiffusionPipeline(
        vae=_seeded(seed, lambda: AutoencoderKL(**VAE_CONFIG)),
        text_encoder=_seeded(seed, lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=_seeded(seed, lambda: UNet2DConditionModel(**UNET_CONFIG)),
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save(pipeline, out_dir, ("tokenizer",))
