"""Activation memory by tracing the engine's own code on fake tensors: no weights, no memory, seconds.

The parts are built on the meta device and set up by the engine itself (`choose`, the attention
processor, `prepare_for_training`), then their parameters become fake CPU tensors (torch's
FakeTensorMode: shapes and dtypes, no data), and a phase of a run (a training step, class-image
generation, a VAE encode) runs as the engine runs it. `LiveBytes` counts the bytes of every tensor
storage alive after each op — what the allocator holds — and the bytes of gradients set so far.

A phase is traced three times, at (2 rows, a x a latents), (3 rows, a x a) and (2 rows, b x b):
each tensor is either fixed (cast weights), per row (text states, norms' statistics) or per row and
pixel (everything convolutional), so the bytes alive at each op are x + y·rows + z·rows·pixels
exactly, and one `Profile` gives the peak for any batch and resolution without tracing again (one
row is traced apart: see `profile`).

torch's own `MemTracker` (torch.distributed._tools) counts the same storages, but it updates a
snapshot of every module at every op: 26 s for one SD 1.5 step where this takes 3 s.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.families import Components


class LiveBytes(TorchDispatchMode):
    """After each op: bytes of the storages alive that were made under this mode, and of gradients."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.grads = 0
        self.samples: list[tuple[int, int]] = []
        # Storages made before (parameters, buffers): a view of one is not new memory.
        self._before = [t.untyped_storage() for t in existing]
        self._known: dict[int, object] = {id(s): s for s in self._before}
        self._graded: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf.untyped_storage())
        self.samples.append((self.live, self.grads))
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._known:
            return
        size = storage.nbytes()
        self._known[key] = weakref.ref(storage, functools.partial(self._freed, key, size))
        self.live += size

    def _freed(self, key: int, size: int, _ref: object) -> None:
        self._known.pop(key, None)
        self.live -= size

    def gradient_set(self, param: torch.Tensor) -> None:
        """A post-accumulate-grad hook: the first gradient of a parameter joins the gradient bytes."""
        if id(param) not in self._graded and param.grad is not None:
            self._graded.add(id(param))
            self.grads += param.grad.numel() * param.grad.element_size()


def cuda_autocast_norms(modules: Iterable[torch.nn.Module]) -> None:
    """Make the group and layer norms behave as under CUDA's autocast, which runs them in fp32 (inputs
    cast up, outputs fp32) where the CPU's autocast keeps them in the low dtype. Set on the module
    instances, so checkpointing's recomputation takes the same path as the forward."""
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, torch.nn.GroupNorm | torch.nn.LayerNorm):
                sub.forward = functools.partial(_norm_in_fp32, sub, type(sub).forward)


def _norm_in_fp32(module: torch.nn.Module, forward: Callable, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_autocast_enabled("cpu"):
        return forward(module, x)
    weight, bias = module.weight, module.bias
    with torch.autocast("cpu", enabled=False):
        if isinstance(module, torch.nn.GroupNorm):
            return F.group_norm(x.float(), module.num_groups, _up(weight), _up(bias), module.eps)
        return F.layer_norm(x.float(), module.normalized_shape, _up(weight), _up(bias), module.eps)


def _up(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None else None


def fakeify(modules: Iterable[torch.nn.Module], mode) -> list[torch.Tensor]:
    """Replace meta parameters and buffers by fake CPU tensors of the same shape, dtype and
    requires_grad, in place (Module.to cannot: it swaps fake tensors, which torch refuses here)."""
    from torch._subclasses.fake_tensor import FakeTensor

    cpu, made = torch.device("cpu"), []
    for module in modules:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None:
                    fake = torch.nn.Parameter(FakeTensor(mode, param.data, cpu), requires_grad=param.requires_grad)
                    sub._parameters[name] = fake
                    made.append(fake)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = FakeTensor(mode, buffer, cpu)
                    made.append(sub._buffers[name])
    return made


@dataclass(frozen=True)
class Profile:
    """Bytes alive at each op of a phase, beyond the weights: grads + const + per_row·rows +
    per_pixel·rows·pixels (pixels: latent height x width); `grads`, the gradients set by then."""

    grads: np.ndarray
    const: np.ndarray
    per_row: np.ndarray
    per_pixel: np.ndarray

    def peak(self, rows: int, pixels: int, grads_held: int | None = None) -> tuple[int, int]:
        """(bytes at the peak op, gradient bytes at it). `grads_held`: every gradient is already set
        from the start (micro-batches accumulating into them), so this many bytes count throughout."""
        if not len(self.const):
            return 0, 0
        grads = self.grads if grads_held is None else np.full_like(self.grads, grads_held)
        live = grads + self.const + self.per_row * rows + self.per_pixel * rows * pixels
        at = int(np.argmax(live))
        return int(live[at]), int(grads[at])

    def pruned(self, rows: Iterable[int], pixels: Iterable[int]) -> Profile:
        """Only the ops that are the peak somewhere on this grid: a few instead of tens of thousands."""
        keep: set[int] = set()
        for r in rows:
            for p in pixels:
                for held in (None, int(self.grads.max(initial=0))):
                    grads = self.grads if held is None else held
                    keep.add(int(np.argmax(grads + self.const + self.per_row * r + self.per_pixel * r * p)))
        index = np.array(sorted(keep))
        return Profile(*(a[index] for a in (self.grads, self.const, self.per_row, self.per_pixel)))

    def to_dict(self) -> dict[str, list[float]]:
        return {name: getattr(self, name).tolist() for name in ("grads", "const", "per_row", "per_pixel")}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> Profile:
        return cls(*(np.asarray(data[name], dtype=np.float64) for name in ("grads", "const", "per_row", "per_pixel")))


class TraceMismatch(RuntimeError):
    """Two traces of one phase ran different ops: sizes changed the code path."""


Phase = Callable[[int, int], None]  # (rows, latent side) -> runs one phase on the fake parts


def profile(phase: Phase, params: list[torch.Tensor], mode, unit: int, one_row: bool) -> Profile:
    """Trace `phase` at three (rows, latent side) points and solve each op's bytes for const, per
    row and per row-pixel. Sides are a = 2·unit and b = 3·unit (unit: the UNet's total downsampling).

    One row is its own case: there a reshape of attention outputs is a free view that makes a copy at
    two rows or more, so `one_row` traces (1, a) and (1, b) (const + per-pixel, valid at one row) and
    otherwise (2, a), (3, a) and (2, b)."""
    a, b = 2 * unit, 3 * unit
    points = ((1, a), (1, b)) if one_row else ((2, a), (3, a), (2, b))
    runs = [np.asarray(_trace(phase, params, mode, rows, side), dtype=np.float64).T for rows, side in points]
    if len({run.shape for run in runs}) != 1:
        raise TraceMismatch(f"traces of one phase ran {[run.shape[-1] for run in runs]} ops")
    grads = runs[0][1]
    if one_row:
        (live_a, _), (live_b, _) = runs
        per_pixel = (live_b - live_a) / (b * b - a * a)
        return Profile(grads, live_a - grads - per_pixel * a * a, np.zeros_like(grads), per_pixel)
    (live_a, _), (live_3a, _), (live_b, _) = runs
    per_pixel = (live_b - live_a) / (2 * (b * b - a * a))
    per_row = (live_3a - live_a) - per_pixel * a * a
    const = live_a - grads - 2 * per_row - 2 * per_pixel * a * a
    return Profile(grads, const, per_row, per_pixel)


def _trace(phase: Phase, params: list[torch.Tensor], mode, rows: int, side: int) -> list:
    tracker = LiveBytes(params)
    hooks = [p.register_post_accumulate_grad_hook(tracker.gradient_set) for p in params if p.requires_grad]
    try:
        with mode, tracker:
            phase(rows, side)
    finally:
        for hook in hooks:
            hook.remove()
        for p in params:
            p.grad = None
    return tracker.samples


# --- the phases, as the engine runs them ------------------------------------------------------
def token_ids(parts: Components, rows: int) -> torch.Tensor:
    """Token ids of `rows` prompts, shaped as the family's tokenize makes them."""
    length = parts.text_encoder.config.max_position_embeddings
    count = len(parts.text_encoders)
    shape = (rows, length) if count == 1 else (rows, count, length)
    return torch.zeros(shape, dtype=torch.long)


def training_step(parts: Components, train_text_encoder: bool, autocast: Callable) -> Phase:
    """trainer.loop.train_step's forward and backward (the optimizer is counted, not traced)."""
    family, unet = parts.family, parts.denoiser
    channels = unet.config.in_channels

    def run(rows: int, side: int) -> None:
        latents = torch.randn(rows, channels, side, side)
        noise = torch.randn_like(latents)
        noisy = latents * 0.5 + noise * 0.5  # add_noise: two scaled terms, as the scheduler makes them
        timesteps = torch.zeros(rows, dtype=torch.long)
        ids, image_info = token_ids(parts, rows), torch.zeros(rows, 6)
        if train_text_encoder:
            with autocast():
                cond = family.encode(parts, ids, parts.text_encoders)
        else:
            with torch.no_grad():  # the cached prompt embeddings
                cond = family.encode(parts, ids)
        with autocast():
            pred = family.predict(unet, noisy, timesteps, cond, image_info)
        pred = pred.float()  # accelerate returns the autocast model's outputs in fp32
        loss = F.mse_loss(pred, noise.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
        loss.backward()

    return run


def generation(parts: Components, autocast: Callable, guidance: bool = True) -> Phase:
    """One denoising step of the family's pipeline on `rows` images (prompt and negative prompt:
    2·rows UNet rows), then the VAE decode of the batch: class images and validation samples."""
    family, unet, vae = parts.family, parts.denoiser, parts.vae
    channels = unet.config.in_channels

    def run(rows: int, side: int) -> None:
        unet_rows = 2 * rows if guidance else rows
        with torch.no_grad(), autocast():
            cond = family.encode(parts, token_ids(parts, unet_rows))
            latents = torch.randn(rows, channels, side, side)
            model_in = torch.cat([latents] * (unet_rows // rows))
            pred = family.predict(
                unet, model_in, torch.zeros(unet_rows, dtype=torch.long), cond, torch.zeros(unet_rows, 6)
            )
            if guidance:
                uncond, text = pred.chunk(2)
                pred = uncond + 7.5 * (text - uncond)
            latents = latents - pred
            del cond, model_in, pred
            vae.decode(latents / vae.config.scaling_factor).sample.float()

    return run


def vae_encoding(parts: Components, scale: int) -> Phase:
    """trainer.data.batches' VAE encode of photos (one at a time, so `rows` is 1 in the engine)."""
    vae = parts.vae

    def run(rows: int, side: int) -> None:
        with torch.no_grad():
            pixels = torch.randn(rows, 3, side * scale, side * scale, dtype=vae.dtype)
            dist = vae.encode(pixels).latent_dist
            dist.mean.float(), dist.std.float()

    return run
