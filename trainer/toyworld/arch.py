"""Shapes of the toy model's parts: the SD 1.x classes, shrunk to fit 32 px images on a CPU.

The VAE downsamples 4x (three blocks), so a 32x32 image is an 8x8x4 latent: small enough for a
UNet to learn on two cores in under an hour, large enough that a shape split into two colours
survives the round trip (every latent pixel covers 4x4 image pixels).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

LATENT_SIZE = 8
TEXT_WIDTH = 48

VAE_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "latent_channels": 4,
    "norm_num_groups": 8,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 4,  # read by diffusers as the number of heads, as in SD 1.x's config
    "norm_num_groups": 16,
}
# The whole 49,408-token CLIP vocabulary stays, so the real tokenizer's ids (and rare tokens such
# as "sks", never seen in pretraining) index the embedding unchanged; it is most of the size.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": TEXT_WIDTH * 4,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
# SD 1.x's noise schedule; DPM-Solver++ samples well in 20 steps.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def new_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def new_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def new_text_encoder(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
