"""The engine's speed choices, made per device and model and printed once at the start of a run.

Each one gives the same result as the plain way within floating-point rounding
(tests/test_speed.py holds them to it); bench/step_candidates.py measures them.

- **Attention kernel.** PyTorch's scaled_dot_product_attention everywhere but for heads of under
  16 channels on the CPU (the toy and small test models have 8), where torch's flash kernel spends
  its time on matrix products of 8-wide operands. There the engine's own kernel runs
  (trainer/kernels/small_heads.c, built at first use by trainer/small_heads.py): keys along SIMD
  lanes, the exponential a polynomial on the same vectors, denormals flushed while it runs, the
  projections' (batch, tokens, heads x channels) rows read and written as they lie; at
  4,096 tokens forward and backward 1.9x faster than the padded flash kernel on an AVX2 machine,
  1.6x than the unpadded one on an AVX-512 machine (bench/step_candidates.py). fp32 only; under bf16, or
  with no C compiler, the heads are zero-padded to 16 channels for the flash kernel instead,
  which leaves q·k and the output unchanged (the softmax scale stays 1/sqrt(true channels)) and
  runs it 1.6-1.7x faster than unpadded. CUDA kernels take any head size; nothing changes there.
- **Selective gradient checkpointing.** Checkpointing recomputes a transformer block's forward
  during the backward pass. Its attention is the expensive part at thousands of tokens, and its
  output is small (the size of the block's input, plus one float per token and head): it is
  kept instead of recomputed (torch's selective activation checkpointing), so only the cheap
  projections and MLP run twice. Below ~1,024 tokens the per-op bookkeeping costs more than the
  attention it saves, so small latents keep plain checkpointing.
- **Re-entrant checkpointing for small latents on the CPU.** torch's default (non-re-entrant)
  checkpointing runs the first forward with autograd on, building the graph and calling a Python
  hook for every tensor it would save (~350 a step on the toy UNet), then builds it again when it
  recomputes. Where the step is hundreds of small operations, that bookkeeping is a tenth of it.
  The re-entrant form runs the first forward without autograd and recomputes it with autograd in
  the backward pass: the same gradients to float rounding in fp32 (under bf16 autocast its backward
  rounds in another order, well inside what bf16 itself changes). It gives gradients only through inputs
  that require them, so when the UNet's first layer is frozen (LoRA) its output is marked as
  requiring them. It runs in one process only (DDP's and DeepSpeed's hooks expect the default form).
- **Optimizer.** bitsandbytes' 8-bit AdamW keeps 32-bit state for tensors under 4,096 elements
  (biases, norms, LoRA matrices) and steps them one call per tensor; here they are stepped
  together by torch's multi-tensor AdamW, the same update on the same state, so an 8-bit run
  with hundreds of small tensors spends less time outside the model. On the CPU the 8-bit
  tensors are stepped by the engine's kernel (trainer/kernels/adamw8bit.c): each block of 256
  dequantized, updated as torch's fused AdamW updates and quantized back with bitsandbytes' own
  rule in one pass while it is in L1 (7.8 ns an element against 24.5 for the torch operations it
  replaces, and 18 for bitsandbytes' scalar CPU quantizer alone); without a compiler they join the
  fused call, their moments dequantized and quantized back in a few vectorised operations for all
  of them. Either way the state keeps bitsandbytes' bytes (trainer/adamw8bit.py).
- **GEGLU on the CPU.** The feed-forward of every transformer block projects to [h | g] and takes
  h * gelu(g): in torch a chunk, a gelu and a product forward, two products, gelu's backward and a
  cat backward, each a pass over the UNet's largest activations. The engine's kernel
  (trainer/kernels/geglu.c, trainer/geglu.py) does the element-wise part in one pass each way, the
  projection staying torch's matrix product: one mid-model layer (4,096 tokens) forward and backward
  48 -> 39 ms, the mid step 3.7% faster (bench/step_candidates.py's engine). fp32 on the CPU; under
  autocast, on CUDA or without a compiler diffusers' own GEGLU runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from trainer import cbuild, geglu, small_heads

# The CPU flash kernel's smallest fast head size (bench/step_candidates.py: 8 -> 16 channels runs
# 1.6x faster; 40 -> 48 gains nothing).
CPU_MIN_HEAD_DIM = 16
# Self-attention length from which keeping attention outputs beats recomputing them (measured on
# this CPU: 256 tokens lose 13 ms a step to the bookkeeping, 4,096 tokens gain 15%).
SELECTIVE_MIN_TOKENS = 1024


class SmallHeadsAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0 for heads of under `min_head_dim` channels on the CPU: the engine's kernel
    (trainer/small_heads.py) where it takes the inputs (fp32, built), else heads zero-padded to
    `min_head_dim` channels for SDPA's.

    Padding q and k with zeros adds nothing to q·k; padding v adds zero output channels, which
    are cut off. Only the plain self/cross-attention of UNet transformer blocks is handled here;
    anything else (masks, group or spatial norms, 4-D inputs) goes to AttnProcessor2_0 unchanged.
    `kernel=False` pads always (bench/step_candidates.py compares the two).
    """

    def __init__(self, min_head_dim: int = CPU_MIN_HEAD_DIM, kernel: bool = True) -> None:
        super().__init__()
        self.min_head_dim = min_head_dim
        self.kernel = kernel

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (
            attention_mask is not None
            or hidden_states.ndim != 3
            or attn.spatial_norm is not None
            or attn.group_norm is not None
            or attn.norm_cross
            or attn.residual_connection
            or attn.norm_q is not None
            or attn.norm_k is not None
        ):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        pad = self.min_head_dim - head_dim
        if pad > 0 and self.kernel and small_heads.usable(query, key, attn.heads):
            # the kernel reads and writes the projections' (B, tokens, heads x channels) rows as they are
            out = small_heads.attention(query, key, value, attn.heads, attn.scale)
        else:
            query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
            if pad > 0:
                query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)[..., :head_dim]
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _attention_ops_to_keep() -> list:
    """The attention kernels whose outputs selective checkpointing keeps: SDPA's (those this torch
    build has) and the engine's for small heads."""
    names = (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    kept = [getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)]
    return kept + [torch.ops.dreambooth.small_head_attention.default]


def selective_checkpoint(module: torch.nn.Module, *args):
    """diffusers' gradient-checkpointing function, keeping attention outputs of transformer blocks."""
    if isinstance(module, BasicTransformerBlock):
        context = functools.partial(create_selective_checkpoint_contexts, _attention_ops_to_keep())
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context)
    return checkpoint(module.__call__, *args, use_reentrant=False)


def head_dims(unet: torch.nn.Module) -> set[int]:
    return {module.inner_dim // module.heads for module in unet.modules() if isinstance(module, Attention)}


def self_attention_tokens(unet_config, latent_size: int) -> int:
    """Tokens of the UNet's largest self-attention: the latent grid at its first attention block."""
    tokens = 0
    for level, block in enumerate(unet_config.down_block_types):
        if "CrossAttn" in block:
            tokens = max(tokens, (latent_size // 2**level) ** 2)
    return tokens


@dataclass(frozen=True)
class SpeedChoices:
    pad_heads: bool
    selective_checkpointing: bool
    # 8-bit AdamW's moments dequantized, updated and quantized in bulk (trainer/adamw8bit.py);
    # on CUDA bitsandbytes' fused kernel does it per tensor
    bulk_8bit: bool = False
    # plain checkpointing in its re-entrant form (small latents on the CPU, one process)
    reentrant_checkpointing: bool = False
    # small heads (pad_heads) on the engine's kernel, built here (trainer/small_heads.py)
    small_head_kernel: bool = False
    # bulk_8bit's 8-bit tensors on the engine's kernel (trainer/kernels/adamw8bit.c), built here
    adamw8bit_kernel: bool = False
    # GEGLU's element-wise part on the engine's kernel (trainer/geglu.py): the CPU, a UNet that has
    # GEGLU feed-forwards, the kernel built here; None: no GEGLU to fuse (nothing to say)
    fused_geglu: bool | None = None

    def describe(self, device: torch.device, heads: set[int], tokens: int, checkpointing: bool) -> str:
        if self.small_head_kernel:
            attention = f"heads of {min(heads)} channels on the engine's CPU kernel for small heads (fp32; else padded)"
        elif self.pad_heads:
            attention = f"heads of {min(heads)} channels padded to {CPU_MIN_HEAD_DIM} for the CPU flash kernel"
            if small_heads.unavailable_reason():
                attention += f" (the engine's kernel for small heads is not built: {small_heads.unavailable_reason()})"
        else:
            attention = "PyTorch SDPA"
        if not checkpointing:
            how = "off"
        elif self.selective_checkpointing:
            how = f"selective (attention outputs kept; {tokens} tokens)"
        else:
            form, why = (", re-entrant", "; the first forward without autograd") if self.reentrant_checkpointing else ("", "")
            how = f"plain{form} ({tokens} tokens: too few to gain from keeping attention{why})"
        line = f"Speed choices on {device.type}: attention {attention}; gradient checkpointing {how}"
        if self.bulk_8bit and self.adamw8bit_kernel:
            line += ("; 8-bit AdamW steps its small tensors in one fused call and each 8-bit one on the engine's "
                     "CPU kernel (a block of 256 dequantized, updated and requantized in one pass)")
        elif self.bulk_8bit:
            line += "; 8-bit AdamW steps every tensor in one fused call, its 8-bit moments requantized in bulk"
            reason = cbuild.adamw8bit()[1]
            if reason:
                line += f" (the engine's 8-bit AdamW kernel is not built: {reason})"
        if self.fused_geglu:
            line += "; GEGLU's gelu and product on the engine's CPU kernel (one pass forward, one backward)"
        elif self.fused_geglu is False and device.type == "cpu":
            line += f"; GEGLU in PyTorch's operations (the engine's GEGLU kernel is not built: {geglu.unavailable_reason()})"
        return line


def choose(
    unet: torch.nn.Module, device: torch.device, latent_size: int, gradient_checkpointing: bool,
    eight_bit: bool = False, one_process: bool = True,
) -> tuple[SpeedChoices, str]:
    """What this device and model get, and the line that says so (`eight_bit`: the run asks for
    8-bit AdamW and bitsandbytes is installed; `one_process`: no DDP, DeepSpeed or FSDP)."""
    heads = head_dims(unet) or {CPU_MIN_HEAD_DIM}
    tokens = self_attention_tokens(unet.config, latent_size)
    selective = gradient_checkpointing and tokens >= SELECTIVE_MIN_TOKENS
    pad_heads = device.type == "cpu" and min(heads) < CPU_MIN_HEAD_DIM
    choices = SpeedChoices(
        pad_heads=pad_heads,
        selective_checkpointing=selective,
        bulk_8bit=eight_bit and device.type == "cpu",
        reentrant_checkpointing=gradient_checkpointing and not selective and device.type == "cpu" and one_process,
        small_head_kernel=pad_heads and small_heads.load() is not None,
        adamw8bit_kernel=eight_bit and device.type == "cpu" and cbuild.adamw8bit()[0] is not None,
        fused_geglu=(device.type == "cpu" and geglu.load() is not None) if geglu.has_geglu(unet) else None,
    )
    return choices, choices.describe(device, heads, tokens, gradient_checkpointing)


def attention_processor(pad_heads: bool, kernel: bool = True) -> AttnProcessor2_0:
    return SmallHeadsAttnProcessor(kernel=kernel) if pad_heads else AttnProcessor2_0()


def reentrant_checkpoint(module: torch.nn.Module, *args):
    """diffusers' gradient-checkpointing function, re-entrant: the first forward runs without autograd."""
    return checkpoint(module.__call__, *args, use_reentrant=True)


def _inputs_require_grad(module: torch.nn.Module, inputs, output: torch.Tensor) -> None:
    """A frozen first layer's output, marked as requiring gradients while training, so that re-entrant
    checkpoints downstream give their trainable parameters (LoRA's) gradients."""
    if torch.is_grad_enabled() and module.training and not output.requires_grad:
        output.requires_grad_(True)


def enable_checkpointing(unet: torch.nn.Module, choices: SpeedChoices) -> None:
    if choices.selective_checkpointing:
        unet.enable_gradient_checkpointing(selective_checkpoint)
    elif choices.reentrant_checkpointing:
        unet.enable_gradient_checkpointing(reentrant_checkpoint)
        unet.conv_in.register_forward_hook(_inputs_require_grad)  # idempotent: a second one changes nothing
    else:
        unet.enable_gradient_checkpointing()
