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
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import cbuild

MAX_CHANNELS = 16  # DMAX in the C source


def _declare(library: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_long
    tail = [ctypes.c_int, ctypes.c_float, ctypes.c_int, pointer]  # channels, scale, threads, scratch
    library.sha_forward.argtypes = [pointer] * 5 + [size] * 4 + tail
    library.sha_backward.argtypes = [pointer] * 9 + [size] * 4 + tail
    library.sha_forward.restype = library.sha_backward.restype = None
    library.sha_scratch.argtypes, library.sha_scratch.restype = [size], size


def load() -> ctypes.CDLL | None:
    """The built library, or None (then `unavailable_reason()` says why)."""
    return cbuild.kernel("small_heads", "DREAMBOOTH_SMALL_HEAD_KERNEL", declare=_declare)[0]


def unavailable_reason() -> str:
    return cbuild.kernel("small_heads", "DREAMBOOTH_SMALL_HEAD_KERNEL", declare=_declare)[1]


def usable(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the kernel takes these (B, heads, tokens, channels) inputs: fp32 on the CPU, few channels."""
    return (
        query.device.type == "cpu"
        and query.dtype == key.dtype == torch.float32
        and query.shape[-1] <= MAX_CHANNELS
        and load() is not None
    )


def _scratch(library: ctypes.CDLL, keys: int) -> tuple[int, torch.Tensor]:
    """The thread count of a kernel call and the scratch its threads write (allocated here, so
    that an allocation that fails is torch's MemoryError, not a crash in C)."""
    threads = torch.get_num_threads()
    return threads, torch.empty(threads * library.sha_scratch(keys), dtype=torch.float32)


def _keys_last(t: torch.Tensor, lanes: int) -> torch.Tensor:
    """(B, H, M, d) -> (B*H, d, M') contiguous, M' the next multiple of `lanes` (zero keys after M)."""
    b, h, m, d = t.shape
    return F.pad(t.reshape(b * h, m, d).transpose(1, 2), (0, -m % lanes)).contiguous()


def _layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """The library and the kernel's layout of its inputs: q (B*H, N, d); kᵀ and vᵀ (B*H, d, M')."""
    library = load()
    b, h, n, d = query.shape
    if d > MAX_CHANNELS or library is None:
        raise ValueError(f"small_head_attention takes heads of up to {MAX_CHANNELS} channels on a built kernel "
                         f"(got {d}; {unavailable_reason() or 'built'}): check small_heads.usable first")
    lanes = library.sha_lanes()
    return library, query.reshape(b * h, n, d).contiguous(), _keys_last(key, lanes), _keys_last(value, lanes)


def _forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q kᵀ) v for (B, heads, tokens, channels) fp32 CPU tensors, and each query's
    log-sum-exp in base 2 (the kernel's scores carry log2 e; kept for the backward pass only)."""
    library, q, kt, vt = _layout(query, key, value)
    b, h, n, d = query.shape
    m = key.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b * h, n, dtype=torch.float32)
    threads, scratch = _scratch(library, kt.shape[2])
    library.sha_forward(
        q.data_ptr(), kt.data_ptr(), vt.data_ptr(), out.data_ptr(), lse.data_ptr(),
        b * h, n, m, kt.shape[2], d, scale, threads, scratch.data_ptr(),
    )
    return out.view(b, h, n, d), lse.view(b, h, n)


small_head_attention = torch.library.custom_op("dreambooth::small_head_attention", _forward, mutates_args=())


@small_head_attention.register_fake
def _(query, key, value, scale):
    return torch.empty_like(query), query.new_empty(query.shape[:-1])


def _backward_kernel(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    library, q, kt, vt = _layout(query, key, value)
    b, h, n, d = query.shape
    m = key.shape[2]
    o, go, lse = (t.reshape(b * h, n, *t.shape[3:]).contiguous() for t in (out, grad_out, lse))
    gq, gkt, gvt = torch.empty_like(q), torch.empty_like(kt), torch.empty_like(vt)
    threads, scratch = _scratch(library, kt.shape[2])
    library.sha_backward(
        q.data_ptr(), kt.data_ptr(), vt.data_ptr(), o.data_ptr(), go.data_ptr(), lse.data_ptr(),
        gq.data_ptr(), gkt.data_ptr(), gvt.data_ptr(), b * h, n, m, kt.shape[2], d, scale, threads,
        scratch.data_ptr(),
    )

    def back(t: torch.Tensor) -> torch.Tensor:
        return t[..., :m].transpose(1, 2).reshape(b, h, m, d)

    return gq.view(b, h, n, d), back(gkt), back(gvt)


small_head_attention_backward = torch.library.custom_op(
    "dreambooth::small_head_attention_backward", _backward_kernel, mutates_args=()
)


@small_head_attention_backward.register_fake
def _(grad_out, query, key, value, out, lse, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    # the log-sum-exp is the kernel's own bookkeeping: nothing downstream uses it, so grad_lse is None
    query, key, value, out, lse = ctx.saved_tensors
    grads = small_head_attention_backward(grad_out.contiguous(), query, key, value, out, lse, ctx.scale)
    return (*grads, None)


small_head_attention.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The same kernels without the dispatcher's Python layers of a custom op (~70 µs a forward and
    backward: about 1% of the toy model's step, whose attention layers are small)."""

    @staticmethod
    def forward(ctx, query, key, value, scale):
        out, lse = _forward(query, key, value, scale)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        return (*_backward_kernel(grad_out.contiguous(), query, key, value, out, lse, ctx.scale), None)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """The kernel's attention. Under a dispatch mode (selective checkpointing's, which keeps this
    operator's output; FLOP or fake-tensor modes) as the registered operator, so the mode sees it;
    otherwise through a plain autograd function, the same kernels."""
    if _get_current_dispatch_mode() is None:
        return _Direct.apply(query, key, value, scale)
    return small_head_attention(query, key, value, scale)[0]
