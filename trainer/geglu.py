"""diffusers' GEGLU with its element-wise part in one pass each way (trainer/kernels/geglu.c).

GEGLU (the feed-forward of every transformer block of SD's UNet) projects x to [h | g] and returns
h * gelu(g). torch runs that as a chunk, a gelu and a multiply, and its backward as two multiplies,
gelu's backward and a cat of the halves' gradients, then copies the cat's transpose for the weight's
gradient: on the mid benchmark model (4,096 tokens, 256 inner channels) ~60 ms a layer forward and
backward, of which the two matrix products are ~11. Here the projection stays torch's `addmm`; the
kernel computes h * gelu(g) in one pass, and the backward writes [dh | dg] in one pass into one
buffer that the weight's and input's gradients read as it is.

`fuse(unet)` swaps each plain GEGLU module's class for `FusedGEGLU` (same parameters, state dict and
config); its forward takes the kernel where `usable` (fp32 CPU tensors, no autocast, a built kernel,
a plain nn.Linear projection) and diffusers' own forward everywhere else. No compiler: nothing is
swapped and `unavailable_reason()` says why (trainer/speed.py prints it).
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU

from trainer import cbuild


def _declare(library: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_long
    library.geglu_forward.argtypes = [pointer, pointer, size, size, ctypes.c_int]
    library.geglu_backward.argtypes = [pointer, pointer, pointer, size, size, ctypes.c_int]
    library.geglu_forward.restype = library.geglu_backward.restype = None
    library.geglu_lanes.argtypes, library.geglu_lanes.restype = [], ctypes.c_int


def load() -> ctypes.CDLL | None:
    """The built library, or None (then `unavailable_reason()` says why; DREAMBOOTH_GEGLU_KERNEL=0 turns it off)."""
    return cbuild.kernel("geglu", "DREAMBOOTH_GEGLU_KERNEL", declare=_declare)[0]


def unavailable_reason() -> str:
    return cbuild.kernel("geglu", "DREAMBOOTH_GEGLU_KERNEL", declare=_declare)[1]


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        library = load()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        proj = F.linear(x2, weight, bias).contiguous()
        rows, inner = proj.shape[0], proj.shape[1] // 2
        out = torch.empty(rows, inner, dtype=proj.dtype)
        library.geglu_forward(proj.data_ptr(), out.data_ptr(), rows, inner, torch.get_num_threads())
        ctx.save_for_backward(x2, weight, proj)
        ctx.has_bias = bias is not None
        ctx.shape = shape
        return out.view(*shape[:-1], inner)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, weight, proj = ctx.saved_tensors
        rows, inner = proj.shape[0], proj.shape[1] // 2
        dout = grad_out.reshape(rows, inner).contiguous()
        dproj = torch.empty_like(proj)
        load().geglu_backward(proj.data_ptr(), dout.data_ptr(), dproj.data_ptr(), rows, inner,
                              torch.get_num_threads())
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (dproj @ weight).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (x2.t() @ dproj).t()  # (x^T dproj)^T: both operands as they lie, no transposed copy
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dproj.sum(0)
        return grad_x, grad_w, grad_b


def usable(module: GEGLU, x: torch.Tensor) -> bool:
    proj = module.proj
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and type(proj) is torch.nn.Linear
        and proj.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and load() is not None
    )


class FusedGEGLU(GEGLU):
    """GEGLU whose element-wise part runs on the engine's kernel where it can (see the module docstring)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs.get("scale") is not None or not usable(self, hidden_states):
            return super().forward(hidden_states, *args, **kwargs)
        return _Fused.apply(hidden_states, self.proj.weight, self.proj.bias)


def has_geglu(model: torch.nn.Module) -> bool:
    return any(isinstance(module, GEGLU) for module in model.modules())


def fuse(model: torch.nn.Module) -> int:
    """Swap every plain GEGLU of `model` for FusedGEGLU (in place); how many were swapped."""
    if load() is None:
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is GEGLU:
            module.__class__ = FusedGEGLU
            swapped += 1
    return swapped
