"""bitsandbytes' 8-bit AdamW with its tensors stepped together (trainer/speed.py says why).

Imported only when bitsandbytes is: `import bitsandbytes` fails on some machines (see optim.py).
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from torch.optim.adamw import adamw

from trainer import cbuild

# bitsandbytes' block size for 8-bit blockwise state (fixed in its CPU kernel and its init_state).
BLOCK = 256
# Its CPU quantizer maps a value scaled into [-1, 1] to one of this many bins, and each bin to the
# nearest code of the 256 (a lookup table built once per code).
LUT_BINS = 65536
# 8-bit elements dequantized at once on the CPU: their fp32 moments (8 bytes an element) are the
# step's only large temporaries, so a chunk bounds them (32 MiB) whatever the model's size.
CPU_CHUNK = 1 << 22


class AdamW8bitTogether(bnb.optim.AdamW8bit):
    """The same optimizer, state and checkpoint format as `bnb.optim.AdamW8bit`, stepped in bulk.

    bitsandbytes keeps fp32 Adam moments (`state1`, `state2`) for tensors under `min_8bit_size`
    elements and updates each with its own call; those updates are the AdamW of torch (same
    decoupled weight decay, bias corrections and eps placement), so they are made here by one
    fused `torch.optim.adamw` call per parameter group on bitsandbytes' own state.

    On the CPU the 8-bit tensors join that call too. bitsandbytes' CPU path dequantizes a tensor's
    two moments with its C kernel, updates them with a dozen separate torch operations and
    quantizes them back with a scalar C loop (about 18 ns an element: three quarters of the time
    of an 8-bit step). Here each chunk of tensors is dequantized (`code[q] * absmax`, as its
    kernel computes it), updated by the fused AdamW, and quantized with bitsandbytes' own rule and
    lookup table in vectorised torch operations (the same bytes and block scales on the same fp32
    moments). On CUDA bitsandbytes' fused 8-bit kernel steps them, unchanged.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            small, eight_bit = [], []
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self.init_state(group, p, gindex, pindex)
                if self._overridden(gindex, pindex) or self.args.max_unorm > 0:
                    self._own_call(group, p, gindex, pindex)
                elif state["state1"].dtype == torch.float32:
                    small.append(p)
                elif _steppable_here(p, state):
                    eight_bit.append(p)
                else:
                    self._own_call(group, p, gindex, pindex)
            self._step_chunks(group, small, eight_bit)
        return loss

    def _own_call(self, group: dict, p: torch.nn.Parameter, gindex: int, pindex: int) -> None:
        self.prefetch_state(p)
        self.update_step(group, p, gindex, pindex)

    def _overridden(self, gindex: int, pindex: int) -> bool:
        """A parameter given its own settings (bitsandbytes' GlobalOptimManager) keeps its own call."""
        return (gindex, pindex) in self.mng.index2config

    def _step_chunks(self, group: dict, small: list, eight_bit: list) -> None:
        kernel = cbuild.adamw8bit()[0] if eight_bit else None
        if kernel is not None:  # the engine's kernel: one pass over each block of an 8-bit tensor
            if small:
                self._step_together(group, small, [])
            for p in eight_bit:
                self._step_kernel(kernel, group, p)
            return
        chunk, size = [], 0
        for p in eight_bit:
            if chunk and size + p.numel() > CPU_CHUNK:
                self._step_together(group, small, chunk)
                small, chunk, size = [], [], 0
            chunk.append(p)
            size += p.numel()
        if small or chunk:
            self._step_together(group, small, chunk)

    def _step_kernel(self, kernel, group: dict, p: torch.nn.Parameter) -> None:
        """One 8-bit tensor stepped by trainer/kernels/adamw8bit.c: its moments dequantized, updated
        as torch's fused AdamW updates them and quantized back, a block of 256 at a time."""
        state = self.state[p]
        state["step"] += 1
        step, (beta1, beta2), lr = state["step"], group["betas"][:2], group["lr"]
        tables = [_lookup_table(state["qmap1"]), _lookup_table(state["qmap2"])]
        kernel.adamw8bit_step(
            p.data.data_ptr(), p.grad.data_ptr(), state["state1"].data_ptr(), state["state2"].data_ptr(),
            state["absmax1"].data_ptr(), state["absmax2"].data_ptr(), state["qmap1"].data_ptr(),
            state["qmap2"].data_ptr(), tables[0].data_ptr(), tables[1].data_ptr(), p.numel(),
            beta2, 1.0 - beta1, 1.0 - beta2, group["eps"], 1.0 - lr * group["weight_decay"], lr / (1.0 - beta1**step),
            math.sqrt(1.0 - beta2**step), torch.get_num_threads(),
        )

    def _step_together(self, group: dict, small: list, eight_bit: list) -> None:
        """One fused AdamW over `small` (fp32 state, updated in place) and `eight_bit` (moments
        dequantized into one buffer per moment, quantized back after the update)."""
        params = small + eight_bit
        states = [self.state[p] for p in params]
        packed = states[len(small):]
        first = _PackedMoment(packed, "state1", "absmax1", "qmap1")
        second = _PackedMoment(packed, "state2", "absmax2", "qmap2")
        # torch counts steps in tensors and adds one before using them; bitsandbytes keeps ints.
        steps = torch.tensor([float(s["step"]) for s in states], device=params[0].device).unbind(0)
        for state in states:
            state["step"] += 1
        beta1, beta2 = group["betas"][:2]
        adamw(
            [p.data for p in params],
            [p.grad for p in params],
            [s["state1"] for s in states[: len(small)]] + first.values,
            [s["state2"] for s in states[: len(small)]] + second.values,
            [],
            list(steps),
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        first.store()
        second.store()


class _PackedMoment:
    """One Adam moment of several 8-bit tensors, dequantized into one fp32 buffer (a view per
    tensor, for the update) and quantized back from it, a few torch operations for all of them.
    Tensors whose size is a whole number of blocks share the buffer's (blocks, 256) view; any
    other is dequantized and quantized on its own."""

    def __init__(self, states: list[dict], name: str, scale: str, code: str) -> None:
        self.name, self.scale = name, scale
        self.code = states[0][code] if states else None
        self.whole = [s for s in states if s[name].numel() % BLOCK == 0]
        self.ragged = [s for s in states if s[name].numel() % BLOCK]
        views = {}
        if self.whole:
            codes = torch.cat([s[name].view(-1) for s in self.whole])
            scales = torch.cat([s[scale] for s in self.whole])
            self.buffer = _dequantize_blocks(codes.view(-1, BLOCK), scales, self.code)
            sizes = [s[name].numel() for s in self.whole]
            for s, part in zip(self.whole, self.buffer.view(-1).split(sizes), strict=True):
                views[id(s)] = part.view(s[name].shape)
        for s in self.ragged:
            views[id(s)] = _dequantize(s[name], s[scale], self.code)
        self.views = views
        self.values = [views[id(s)] for s in states]  # fp32, in the order of `states`, for the update

    def store(self) -> None:
        """Quantize the updated values back into each tensor's state and block scales."""
        if self.whole:
            codes = torch.empty(self.buffer.shape, dtype=torch.uint8, device=self.buffer.device)
            scales = torch.empty(self.buffer.shape[0], dtype=torch.float32, device=self.buffer.device)
            _quantize_blocks(self.buffer, self.code, codes, scales)
            sizes = [s[self.name].numel() for s in self.whole]
            for s, part, part_scales in zip(self.whole, codes.view(-1).split(sizes),
                                            scales.split([n // BLOCK for n in sizes]), strict=True):
                s[self.name].view(-1).copy_(part)
                s[self.scale].copy_(part_scales)
        for s in self.ragged:
            _quantize_into(self.views[id(s)], self.code, s[self.name], s[self.scale])


def _steppable_here(p: torch.nn.Parameter, state: dict) -> bool:
    """8-bit state this module steps itself: on the CPU, fp32 weights, gradients, scales and codes, row-major."""
    return (
        p.device.type == "cpu"
        and p.dtype == p.grad.dtype == torch.float32
        and p.is_contiguous()
        and p.grad.is_contiguous()
        and state["state1"].is_contiguous()
        and state["state2"].is_contiguous()
        and all(state[k].dtype == torch.float32 and state[k].is_contiguous() for k in ("absmax1", "absmax2", "qmap1", "qmap2"))
    )


def _blocks(n: int) -> list[tuple[slice, slice]]:
    """(elements, block scales) of the whole blocks, then of the last partial block if any."""
    whole = n // BLOCK
    parts = [(slice(0, whole * BLOCK), slice(0, whole))] if whole else []
    if n % BLOCK:
        parts.append((slice(whole * BLOCK, n), slice(whole, whole + 1)))
    return parts


def _dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """fp32 values of rows of 8-bit codes, one block a row: `code[q] * absmax`, as bitsandbytes' kernel."""
    values = code.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
    return values.mul_(scales.unsqueeze(1))


def _quantize_blocks(block: torch.Tensor, code: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """bitsandbytes' CPU blockwise quantization of rows (one block a row), into `codes` and
    `scales`: each block's scale is its largest magnitude; a value scaled by its inverse into
    [-1, 1] falls in bin `trunc(((x + 1) * 0.5) * 65535 + 0.5)`, and the bin holds its nearest code;
    an all-zero block is scale 0, codes 0."""
    torch.amax(block.abs(), dim=1, out=scales)
    zero = (scales == 0).unsqueeze(1)
    inverse = scales.reciprocal().unsqueeze(1).masked_fill_(zero, 0)
    x = torch.mul(block, inverse).clamp_(-1.0, 1.0)
    bins = x.add_(1.0).mul_(0.5).mul_(LUT_BINS - 1).add_(0.5).to(torch.int32)
    torch.index_select(_lookup_table(code), 0, bins.view(-1), out=codes.view(-1))
    if zero.any():
        codes.masked_fill_(zero, 0)


def _dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """fp32 values of one tensor's 8-bit blockwise state (its last block may be partial)."""
    flat = q.view(-1)
    parts = [_dequantize_blocks(flat[e].view(s.stop - s.start, -1), absmax[s], code) for e, s in _blocks(flat.numel())]
    return torch.cat([p.view(-1) for p in parts]).view(q.shape)


def _quantize_into(values: torch.Tensor, code: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor) -> None:
    """One tensor's fp32 values quantized into its 8-bit state `q` and block scales `absmax`."""
    flat, codes = values.reshape(-1), q.view(-1)
    for e, s in _blocks(flat.numel()):
        rows = s.stop - s.start
        out = torch.empty(rows, (e.stop - e.start) // rows, dtype=torch.uint8)
        _quantize_blocks(flat[e].view(rows, -1), code, out, absmax[s])
        codes[e] = out.view(-1)


_LUTS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _lookup_table(code: torch.Tensor) -> torch.Tensor:
    """Bin -> index of the nearest code, as bitsandbytes builds it: the number of midpoints between
    consecutive codes that lie below the bin's value `-1 + 2 i / 65535`."""
    key = (code.data_ptr(), code.device.index or 0)
    cached = _LUTS.get(key)
    if cached is not None and torch.equal(cached[0], code):
        return cached[1]
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_BINS, dtype=torch.float32, device=code.device)) / (LUT_BINS - 1)
    lut = torch.searchsorted(midpoints, grid, right=False).to(torch.uint8)
    _LUTS[key] = (code.clone(), lut)
    return lut
