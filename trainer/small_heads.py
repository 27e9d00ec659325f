"""The engine's CPU attention kernel for heads of few channels (trainer/kernels/small_heads.c).

Built at first use with the machine's C compiler into the user's cache folder (trainer/cbuild.py),
loaded with ctypes and registered as the torch operator
`dreambooth::small_head_attention` with its backward, so autograd, gradient checkpointing and
selective checkpointing (which keeps its output) treat it like SDPA. No compiler, or a build that
fails: `load()` returns None, says why in `unavailable_reason()`, and the engine keeps PyTorch's
SDPA (trainer/speed.py prints which one runs).
"""

from __future__ import annotations

import ctypes

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from trainer import cbuild

MAX_CHANNELS = 16  # DMAX in the C source


def _declare(library: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_long
    tail = [ctypes.c_int, ctypes.c_float, ctypes.c_int, pointer]  # channels, scale, threads, scratch
    library.sha_forward.argtypes = [pointer] * 5 + [size] * 4 + tail
    library.sha_backward.argtypes = [pointer] * 9 + [size] * 4 + tail
    library.sha_forward.restype = library.sha_backward.restype = None
    library.sha_scratch.argtypes, library.sha_scratch.restype = [size, ctypes.c_int], size


def load() -> ctypes.CDLL | None:
    """The built library, or None (then `unavailable_reason()` says why)."""
    return cbuild.kernel("small_heads", "DREAMBOOTH_SMALL_HEAD_KERNEL", declare=_declare)[0]


def unavailable_reason() -> str:
    return cbuild.kernel("small_heads", "DREAMBOOTH_SMALL_HEAD_KERNEL", declare=_declare)[1]


def usable(query: torch.Tensor, key: torch.Tensor, heads: int) -> bool:
    """Whether the kernel takes these (B, tokens, heads x channels) inputs: fp32 on the CPU, few channels."""
    return (
        query.device.type == "cpu"
        and query.dtype == key.dtype == torch.float32
        and query.shape[-1] // heads <= MAX_CHANNELS
        and load() is not None
    )


def _library(channels: int) -> ctypes.CDLL:
    library = load()
    if channels > MAX_CHANNELS or library is None:
        raise ValueError(f"small_head_attention takes heads of up to {MAX_CHANNELS} channels on a built kernel "
                         f"(got {channels}; {unavailable_reason() or 'built'}): check small_heads.usable first")
    return library


def _scratch(library: ctypes.CDLL, keys: int, channels: int) -> tuple[int, torch.Tensor]:
    """The thread count of a kernel call and the scratch its threads write (allocated here, so
    that an allocation that fails is torch's MemoryError, not a crash in C)."""
    threads = torch.get_num_threads()
    return threads, torch.empty(threads * library.sha_scratch(keys, channels), dtype=torch.float32)


def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q kᵀ) v per head for fp32 CPU tensors laid out as the UNet's projections give
    them, (B, tokens, heads x channels), in the same layout; and each query's log-sum-exp in base 2
    ((B·heads, tokens); the kernel's scores carry log2 e; kept for the backward pass only)."""
    b, n, width = query.shape
    m, d = key.shape[1], width // heads
    library = _library(d)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    out = torch.empty_like(query)
    lse = torch.empty(b * heads, n, dtype=torch.float32)
    threads, scratch = _scratch(library, m, d)
    library.sha_forward(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), lse.data_ptr(),
        b, heads, n, m, d, scale, threads, scratch.data_ptr(),
    )
    return out, lse


small_head_attention = torch.library.custom_op("dreambooth::small_head_attention", _forward, mutates_args=())


@small_head_attention.register_fake
def _(query, key, value, heads, scale):
    return torch.empty_like(query), query.new_empty(query.shape[0] * heads, query.shape[1])


def _backward_kernel(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, width = query.shape
    m, d = key.shape[1], width // heads
    library = _library(d)
    query, key, value, out, grad_out = (t.contiguous() for t in (query, key, value, out, grad_out))
    gq, gk, gv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    threads, scratch = _scratch(library, m, d)
    library.sha_backward(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(),
        gq.data_ptr(), gk.data_ptr(), gv.data_ptr(), b, heads, n, m, d, scale, threads, scratch.data_ptr(),
    )
    return gq, gk, gv


small_head_attention_backward = torch.library.custom_op(
    "dreambooth::small_head_attention_backward", _backward_kernel, mutates_args=()
)


@small_head_attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, heads, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, grad_out, grad_lse):
    # the log-sum-exp is the kernel's own bookkeeping: nothing downstream uses it, so grad_lse is None
    query, key, value, out, lse = ctx.saved_tensors
    grads = small_head_attention_backward(grad_out, query, key, value, out, lse, ctx.heads, ctx.scale)
    return (*grads, None, None)


small_head_attention.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The same kernels without the dispatcher's Python layers of a custom op (~70 µs a forward and
    backward: about 1% of the toy model's step, whose attention layers are small)."""

    @staticmethod
    def forward(ctx, query, key, value, heads, scale):
        out, lse = _forward(query, key, value, heads, scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        return (*_backward_kernel(grad_out, query, key, value, out, lse, ctx.heads, ctx.scale), None, None)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The kernel's attention of (B, tokens, heads x channels) queries, keys and values (the layout of
    the UNet's projections), in that layout. Under a dispatch mode (selective checkpointing's, which
    keeps this operator's output; FLOP or fake-tensor modes) as the registered operator, so the mode
    sees it; otherwise through a plain autograd function, the same kernels."""
    if _get_current_dispatch_mode() is None:
        return _Direct.apply(query, key, value, heads, scale)
    return small_head_attention(query, key, value, heads, scale)[0]
