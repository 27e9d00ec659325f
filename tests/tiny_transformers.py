"""Tiny, randomly initialised FLUX.1 and Stable Diffusion 3 models, with the classes and layout of the real ones.

Like tests/tiny_model.py's tiny SD 1.5 and SDXL, each is saved exactly as its Hub model is
(`model_index.json` + one folder per component, safetensors only), so it loads through the same
`FluxPipeline.from_pretrained(folder)` / `StableDiffusion3Pipeline.from_pretrained(folder)`, samples
a 32x32 image in a second or two on a CPU and needs no network. Its images are noise-like: it checks
the plumbing, not the art. The weights come from a fixed torch seed, one re-seed per component.

Both read prompts with the real CLIP tokenizer (trainer/assets/clip-tokenizer) and a small T5
tokenizer of the same kind as T5 v1.1's (trainer/assets/t5-tokenizer, written by
`python tools/build_t5_tokenizer.py`); the shapes follow diffusers' own tests of these pipelines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from tiny_model import TEXT_ENCODER_CONFIG, VAE_CONFIG
from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from trainer.toyworld import CLIP_TOKENIZER_DIR, T5_TOKENIZER_DIR

SEED = 0

# --- FLUX.1 -------------------------------------------------------------------------------------
# FLUX packs each 2x2 patch of its latent into one token, so the transformer's in_channels are
# 4 x the VAE's latent_channels (64 = 4 x 16 in the real model, 16 = 4 x 4 here). The rotary
# embedding splits each attention head over (text index, row, column): axes_dims_rope sums to
# attention_head_dim, each axis even. Text tokens come from T5 (joint_attention_dim = its d_model),
# the pooled vector from CLIP's pooler output (pooled_projection_dim = its hidden size). Widths of 64
# (4 heads of 16; T5's d_model): bitsandbytes quantizes each weight row in blocks of 64, so the
# QLoRA tests quantize every block layer and T5, as in the real model.
FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 4, 8),
}
# FLUX's VAE: 16 latent channels (4 here), a shift as well as a scale, no 1x1 quant convolutions.
# Two blocks give a 2x downsampling: a 32x32 image is a 16x16 latent, 8x8 = 64 packed tokens.
FLUX_VAE_CONFIG: dict[str, Any] = {
    **VAE_CONFIG,
    "latent_channels": 4,
    "scaling_factor": 0.3611,  # FLUX.1's values
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# FLUX.1-dev's scheduler/scheduler_config.json: the shift grows with the image's token count.
FLUX_DEV_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# FLUX.1-schnell's (no guidance embedding): a fixed shift of 1.
FLUX_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    **FLUX_DEV_SCHEDULER_CONFIG,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

# --- Stable Diffusion 3 ---------------------------------------------------------------------------
# SD 3 concatenates the two CLIPs' penultimate hidden states along the features (32 + 32 = 64, as
# CLIP-L's 768 + CLIP-G's 1280 = 2048), zero-pads that to T5's width and puts T5's tokens after them.
# The pad is `F.pad(clip, (0, t5_width - clip_width))`: were T5 narrower than the two CLIPs together
# (as in diffusers' own tiny SD 3, T5 32 wide), the pad would be negative and silently crop the
# CLIP features. So T5 here is 64 wide, and joint_attention_dim = 64 (4096 in the real model).
# The pooled vector is both CLIPs' projected text_embeds side by side: 32 + 32 = 64.
# caption_projection_dim must be the transformer's width, num_attention_heads x attention_head_dim.
SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 16,  # the latent of a 32x32 image: the pipeline's default size is 16 x 2 = 32 px
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,  # latents up to 64x64 (128 px images)
}
SD3_VAE_CONFIG: dict[str, Any] = {
    **FLUX_VAE_CONFIG,
    "scaling_factor": 1.5305,  # SD 3's values
    "shift_factor": 0.0609,
}
# stable-diffusion-3-medium's scheduler/scheduler_config.json.
SD3_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
# SD 3's CLIP-L and CLIP-G both have a text projection; their text_embeds are the pooled vector.
SD3_CLIP_CONFIG: dict[str, Any] = {**TEXT_ENCODER_CONFIG, "projection_dim": 32}


# --- T5 ---------------------------------------------------------------------------------------------
def t5_config(d_model: int, vocab_size: int) -> T5Config:
    """A two-layer T5 v1.1 encoder (gated GELU, untied embeddings) of width `d_model`.

    `vocab_size` is the tokenizer's length, so every id it gives indexes the embedding (the real
    T5 v1.1 pads its 32,100 tokens to 32,128 rows; here rows and tokens are the same).
    """
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


# The classes the real model_index.json files name; transformers 5 has made T5TokenizerFast an alias
# of T5Tokenizer and would write that name, which older transformers load only with sentencepiece.
REAL_TOKENIZER_CLASSES: dict[str, str] = {"CLIPTokenizer": "CLIPTokenizer", "T5Tokenizer": "T5TokenizerFast"}


def _check_tokenizers() -> None:
    if not (CLIP_TOKENIZER_DIR / "vocab.json").is_file():
        raise FileNotFoundError(
            f"The CLIP tokenizer is missing from {CLIP_TOKENIZER_DIR}: run `python tools/build_clip_tokenizer.py`."
        )
    if not (T5_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"The T5 tokenizer is missing from {T5_TOKENIZER_DIR}: run `python tools/build_t5_tokenizer.py`."
        )


def _seeded(seed: int, make):
    """Re-seed before each component, so changing one component's config leaves the others' weights alone."""
    torch.manual_seed(seed)
    return make()


def _save(pipeline, folder: Path, tokenizers: dict[str, Path]) -> Path:
    """Save (safetensors), ship the committed tokenizer folders as they are, name the real tokenizer classes."""
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name, source in tokenizers.items():
        shutil.rmtree(folder / name)
        shutil.copytree(source, folder / name)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for name in tokenizers:
        library, class_name = index[name]
        index[name] = [library, REAL_TOKENIZER_CLASSES.get(class_name, class_name)]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def build_tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1 (FluxPipeline), saved like the real one; returns `folder`.

    `guidance_embeds=True` is FLUX.1-dev (guidance-distilled: `guidance_scale` is an input of the
    transformer) with its dynamically shifted scheduler; False is FLUX.1-schnell, with its scheduler.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    _check_tokenizers()
    t5_tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)
    transformer_config = {**FLUX_TRANSFORMER_CONFIG, "guidance_embeds": guidance_embeds}
    scheduler_config = FLUX_DEV_SCHEDULER_CONFIG if guidance_embeds else FLUX_SCHNELL_SCHEDULER_CONFIG
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=_seeded(SEED, lambda: AutoencoderKL(**FLUX_VAE_CONFIG)),
        text_encoder=_seeded(SEED, lambda: CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        text_encoder_2=_seeded(SEED, lambda: T5EncoderModel(t5_config(64, len(t5_tokenizer)))),
        tokenizer_2=t5_tokenizer,
        transformer=_seeded(SEED, lambda: FluxTransformer2DModel(**transformer_config)),
    )
    return _save(pipeline, Path(folder), {"tokenizer": CLIP_TOKENIZER_DIR, "tokenizer_2": T5_TOKENIZER_DIR})


def build_tiny_sd3(folder: Path) -> Path:
    """A tiny Stable Diffusion 3 (StableDiffusion3Pipeline), saved like the real one; returns `folder`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    _check_tokenizers()
    t5_tokenizer = T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)
    pipeline = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=_seeded(SEED, lambda: AutoencoderKL(**SD3_VAE_CONFIG)),
        text_encoder=_seeded(SEED, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_CONFIG))),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        text_encoder_2=_seeded(SEED + 1, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SD3_CLIP_CONFIG))),
        tokenizer_2=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        text_encoder_3=_seeded(SEED, lambda: T5EncoderModel(t5_config(64, len(t5_tokenizer)))),
        tokenizer_3=t5_tokenizer,
        transformer=_seeded(SEED, lambda: SD3Transformer2DModel(**SD3_TRANSFORMER_CONFIG)),
    )
    tokenizers = {"tokenizer": CLIP_TOKENIZER_DIR, "tokenizer_2": CLIP_TOKENIZER_DIR, "tokenizer_3": T5_TOKENIZER_DIR}
    return _save(pipeline, Path(folder), tokenizers)
