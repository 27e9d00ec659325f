"""Selective gradient checkpointing: a transformer block's attention output is kept, not recomputed.

Gradient checkpointing recomputes each block's forward during the backward pass. A transformer
block's attention is its expensive part at thousands of tokens, and its output is small (the size
of the block's input, plus one float per token and head), so it is kept (torch's selective
activation checkpointing) and only the projections and the MLP run twice. Below ~1,024 tokens the
per-op bookkeeping costs more than the attention it saves, so small latents keep diffusers' plain
checkpointing. bench/checkpointing.py measures it on SD 1.5's UNet at 512 px (docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

# Self-attention length from which keeping attention outputs beats recomputing them.
SELECTIVE_MIN_TOKENS = 1024
_SDPA_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def self_attention_tokens(unet_config, latent_size: int) -> int:
    """Tokens of the UNet's largest self-attention: the latent grid at its first attention block."""
    tokens = 0
    for level, block in enumerate(unet_config.down_block_types):
        if "CrossAttn" in block:
            tokens = max(tokens, (latent_size // 2**level) ** 2)
    return tokens


def selective(unet_config, latent_size: int, gradient_checkpointing: bool) -> bool:
    """Whether a run at this latent size checkpoints selectively."""
    return gradient_checkpointing and self_attention_tokens(unet_config, latent_size) >= SELECTIVE_MIN_TOKENS


def selective_checkpoint(module: torch.nn.Module, *args):
    """diffusers' gradient-checkpointing function, keeping attention outputs of transformer blocks."""
    if isinstance(module, BasicTransformerBlock):
        kept = [getattr(torch.ops.aten, name).default for name in _SDPA_KERNELS if hasattr(torch.ops.aten, name)]
        context = functools.partial(create_selective_checkpoint_contexts, kept)
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context)
    return checkpoint(module.__call__, *args, use_reentrant=False)


def enable_checkpointing(unet: torch.nn.Module, latent_size: int) -> str:
    """Turn on the denoiser's gradient checkpointing, selective where it pays (a UNet's); the line that says which."""
    if not hasattr(unet.config, "down_block_types"):  # a transformer (SD 3, FLUX): diffusers' own, per block
        unet.enable_gradient_checkpointing()
        return "gradient checkpointing per transformer block"
    tokens = self_attention_tokens(unet.config, latent_size)
    if tokens >= SELECTIVE_MIN_TOKENS:
        unet.enable_gradient_checkpointing(selective_checkpoint)
        return f"gradient checkpointing selective (attention outputs kept at {tokens} tokens)"
    unet.enable_gradient_checkpointing()
    return f"gradient checkpointing plain ({tokens} tokens: too few to gain from keeping attention)"
