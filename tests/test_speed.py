"""The engine's speed choices (trainer/speed.py, trainer/adamw8bit.py) change time, not results."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import tiny_config

from trainer import cbuild, geglu, small_heads, train
from trainer.adamw8bit import BLOCK, AdamW8bitTogether, _quantize_blocks
from trainer.allocator import in_use
from trainer.events import PhaseEvent
from trainer.speed import SmallHeadsAttnProcessor, SpeedChoices, choose, enable_checkpointing, head_dims

# Stated tolerances. Padding adds exact zeros, but the kernel's blocking changes the order of the
# float sums: outputs and gradients agree to ~1e-6. Adam then divides each gradient by its own
# running size, so where a gradient is near zero a rounding-level difference can move that weight
# by a fraction of a step (measured: 7 of 793k weights by 1e-4 to 2.2e-4 after 3 steps at lr 1e-3;
# 8-bit against fp32 AdamW on the same run differ by 1.5e-3).
LR = 1e-3
LOSS_RTOL = 1e-5
CLOSE = 1e-6  # "the same weight": 0.1% of one step
CLOSE_SHARE = 0.999  # at least this share of all weights are the same
WEIGHT_ATOL = 0.3 * LR  # and none is further apart than 30% of one step


def _unet(model_dir) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.train()
    return unet


def _inputs(unet: UNet2DConditionModel, latent: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    channels = unet.config.in_channels
    latents = torch.randn(2, channels, latent, latent, generator=gen)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    target = torch.randn(2, channels, latent, latent, generator=gen)
    return latents, torch.tensor([500, 20]), hidden, target


@pytest.mark.parametrize("kernel", [True, False], ids=["engine-kernel", "padded-sdpa"])
def test_small_heads_give_the_same_attention_and_gradients(tiny_model_dir, kernel, monkeypatch):
    """The UNet with its 8-channel heads on the engine's kernel, or padded for SDPA's, against SDPA."""
    plain, small = _unet(tiny_model_dir), _unet(tiny_model_dir)
    assert min(head_dims(plain)) == 8 and _small_attentions(plain) > 0  # the small-heads path runs
    calls = []
    original = small_heads.attention
    monkeypatch.setattr(small_heads, "attention", lambda *args: calls.append(1) or original(*args))
    plain.set_attn_processor(AttnProcessor2_0())
    small.set_attn_processor(SmallHeadsAttnProcessor(kernel=kernel))
    latents, timesteps, hidden, target = _inputs(plain, 16)
    outputs = []
    for unet in (plain, small):
        out = unet(latents, timesteps, hidden).sample
        F.mse_loss(out, target).backward()
        outputs.append(out.detach())
    assert len(calls) == (_small_attentions(small) if kernel else 0)
    assert (outputs[0] - outputs[1]).abs().max().item() < 1e-5
    assert outputs[0].abs().max().item() > 0.1  # a real output, not zeros compared with zeros
    grads = {name: p.grad for name, p in plain.named_parameters()}
    worst = max((p.grad - grads[name]).abs().max().item() for name, p in small.named_parameters())
    assert worst < 1e-5


def _small_attentions(unet) -> int:
    """Attention layers whose heads have under 16 channels: those the kernel runs."""
    return sum(1 for m in unet.modules() if isinstance(m, Attention) and m.inner_dim // m.heads < 16)


class _Watching(TorchDispatchMode):
    """A dispatch mode that only notes the operators it sees."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("batch", "heads", "queries", "keys", "channels", "threads"),
    [(2, 8, 256, 256, 8, 1), (1, 3, 37, 21, 5, 1), (2, 2, 300, 77, 8, 1), (1, 1, 9, 4096, 1, 1), (2, 3, 70, 1100, 8, 2)],
)
@pytest.mark.parametrize("route", ["autograd-function", "operator"])
def test_the_small_heads_kernel_matches_attention_in_double_precision(
    batch, heads, queries, keys, channels, threads, route, monkeypatch
):
    """Forward and gradients of q, k and v, against SDPA in fp64, for shapes the kernel's blocking
    does not divide (queries not a multiple of its 8, keys not of its SIMD width nor of its key
    block, odd channels), on one thread and on two (each with its own scratch); called plainly (a
    torch.autograd.Function) and under a dispatch mode (the registered operator, as selective
    checkpointing calls it)."""
    assert small_heads.load() is not None, small_heads.unavailable_reason()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the kernel call asks OpenMP for
    gen = torch.Generator().manual_seed(queries + keys)
    q, k, v = (3 * torch.randn(batch, heads, n, channels, generator=gen) for n in (queries, keys, keys))
    grad_out = torch.randn(batch, heads, queries, channels, generator=gen)
    scale = channels**-0.5
    ours = [_rows(t).requires_grad_() for t in (q, k, v)]  # the projections' layout, which the kernel takes
    seen = []
    with _Watching(seen) if route == "operator" else contextlib.nullcontext():
        out = small_heads.attention(*ours, heads, scale)
        out.backward(_rows(grad_out))
    assert ("dreambooth.small_head_attention_backward.default" in seen) == (route == "operator")
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*ref, scale=scale)
    expected.backward(grad_out.double())
    pairs = [(out, expected)] + [(a.grad, b.grad) for a, b in zip(ours, ref, strict=True)]
    for got, want in ((got, _rows(want)) for got, want in pairs):
        assert want.abs().max() > 1e-3  # a real value, not zeros compared with zeros
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert error < 2e-5, error


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, tokens, channels) -> (B, tokens, heads x channels), a new contiguous tensor."""
    return t.transpose(1, 2).flatten(2).contiguous()


_SIMD_CHECK = """
import torch, torch.nn.functional as F
from trainer import small_heads
rows = lambda t: t.transpose(1, 2).flatten(2).contiguous()
assert small_heads.load() is not None, small_heads.unavailable_reason()
print("lanes", small_heads.load().sha_lanes())
torch.set_num_threads(2)
for batch, heads, queries, keys, channels in [(1, 3, 37, 77, 8), (2, 2, 70, 1100, 8), (1, 2, 19, 21, 5)]:
    gen = torch.Generator().manual_seed(queries + keys)
    q, k, v = (3 * torch.randn(batch, heads, n, channels, generator=gen) for n in (queries, keys, keys))
    grad_out = torch.randn(batch, heads, queries, channels, generator=gen)
    ours = [rows(t).requires_grad_() for t in (q, k, v)]
    out = small_heads.attention(*ours, heads, channels**-0.5)
    out.backward(rows(grad_out))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*ref, scale=channels**-0.5)
    expected.backward(grad_out.double())
    for got, want in [(out, expected)] + [(a.grad, b.grad) for a, b in zip(ours, ref, strict=True)]:
        print("error", ((got.double() - rows(want)).abs().max() / want.abs().max()).item())
"""


@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512f -mno-avx2 -mno-fma"], ids=["avx2", "portable"])
def test_the_kernels_other_simd_paths_match_attention(flags, tmp_path):
    """The kernel has an AVX-512 path, an AVX2 one and a portable one (gcc's vector extensions alone);
    a machine builds one. The others are built here by a compiler that turns instruction sets off,
    each checked against SDPA in fp64 (tail keys, two threads, odd channels)."""
    compiler = os.environ.get("CC") or "gcc"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\nexec {compiler} "$@" {flags}\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CC": str(wrapper), "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _SIMD_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if "could not build" in done.stderr:  # not an x86 machine: these flags do not exist
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lanes 8" in done.stdout  # 8 floats a vector: not the AVX-512 build
    errors = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 12 and max(errors) < 2e-5, errors


_GEGLU_CHECK = """
import copy, torch
from diffusers.models.activations import GEGLU
from trainer import geglu
assert geglu.load() is not None, geglu.unavailable_reason()
print("lanes", geglu.load().geglu_lanes())
torch.set_num_threads(THREADS)
torch.manual_seed(0)
for dim, inner, rows, bias, frozen in ((64, 256, 512, True, False), (7, 13, 37, False, False), (16, 40, 33, True, True)):
    plain = GEGLU(dim, inner, bias=bias)
    plain.proj.weight.requires_grad_(not frozen)
    fused = copy.deepcopy(plain)
    assert geglu.fuse(fused) == 1
    x = torch.randn(2, rows, dim) * 4  # gates out to about +-12: erfc's tails
    grad = torch.randn(2, rows, inner)
    ours = x.clone().requires_grad_()
    out = fused(ours)
    out.backward(grad)
    wide = copy.deepcopy(plain).double()
    ref = x.double().requires_grad_()
    expected = wide(ref)
    expected.backward(grad.double())
    pairs = [(out, expected), (ours.grad, ref.grad)]
    pairs += [] if frozen else [(fused.proj.weight.grad, wide.proj.weight.grad)]
    pairs += [(fused.proj.bias.grad, wide.proj.bias.grad)] if bias else []
    assert frozen == (fused.proj.weight.grad is None)
    for got, want in pairs:
        print("error", ((got.double() - want).abs().max() / want.abs().max()).item())
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_the_geglu_kernel_matches_geglu_in_double_precision(threads):
    """The kernel's GEGLU (forward; gradients of the input, weight and bias; a frozen projection as
    under LoRA; inner sizes its vectors do not divide) against diffusers' GEGLU in fp64. torch's own
    fp32 GEGLU is within 6e-7 of it on these shapes."""
    done = subprocess.run([sys.executable, "-c", _GEGLU_CHECK.replace("THREADS", str(threads))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 10 and max(errors) < 2e-6, errors


@pytest.mark.parametrize(("flags", "lanes"), [("-mno-avx512f", 8), ("-mno-avx512f -mno-avx2 -mno-fma -mno-avx", 4)],
                         ids=["avx", "sse"])
def test_the_geglu_kernels_other_simd_widths_match_geglu(flags, lanes, tmp_path):
    compiler = os.environ.get("CC") or "gcc"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\nexec {compiler} "$@" {flags}\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CC": str(wrapper), "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _GEGLU_CHECK.replace("THREADS", "2")], env=env,
                          capture_output=True, text=True, timeout=300)
    if "could not build" in done.stderr:  # not an x86 machine: these flags do not exist
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"lanes {lanes}" in done.stdout
    errors = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 10 and max(errors) < 2e-6, errors


def test_fused_geglu_leaves_autocast_and_adapted_projections_to_diffusers():
    """Under bf16 autocast, or with a LoRA-wrapped projection, FusedGEGLU is diffusers' GEGLU: the same
    output to the bit, and the kernel is not called."""
    from diffusers.models.activations import GEGLU
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    plain = GEGLU(16, 32)
    fused = copy.deepcopy(plain)
    assert geglu.fuse(fused) == 1
    x = torch.randn(2, 5, 16)
    assert geglu.usable(fused, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not geglu.usable(fused, x)
        assert torch.equal(fused(x), plain(x))
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), plain)
    adapted = copy.deepcopy(plain)
    assert geglu.fuse(adapted) == 1
    assert not geglu.usable(adapted, x) and torch.equal(adapted(x), plain(x))


def test_the_kernel_leaves_denormal_floats_on_for_the_caller():
    """The kernel flushes denormals to zero while it runs (x86 is slow on them); torch's own
    arithmetic afterwards keeps them."""
    assert small_heads.load() is not None, small_heads.unavailable_reason()
    tiny = torch.tensor([1e-38])
    assert (tiny * 1e-3).item() > 0  # denormal, not flushed, before
    q = torch.randn(1, 9, 8)
    small_heads.attention(q, q, q, 1, 0.35)
    assert (tiny * 1e-3).item() > 0


def test_selective_checkpointing_keeps_the_small_heads_kernels_output(tiny_model_dir, monkeypatch):
    """At 1,024 tokens the engine keeps attention outputs: its kernel's forward runs once per
    attention layer in a checkpointed step, not again in the backward pass."""
    unet = _unet(tiny_model_dir)
    unet.set_attn_processor(SmallHeadsAttnProcessor())
    enable_checkpointing(unet, SpeedChoices(True, True))
    calls = []
    original = small_heads.attention
    monkeypatch.setattr(small_heads, "attention", lambda *args: calls.append(1) or original(*args))
    latents, timesteps, hidden, target = _inputs(unet, 32)
    loss = F.mse_loss(unet(latents, timesteps, hidden).sample, target)
    forward_calls = len(calls)
    loss.backward()
    assert forward_calls == _small_attentions(unet) > 0
    # the recomputation calls the processor again, but the kernel's result comes from what was kept
    ops = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.dreambooth.small_head_attention.default:
                ops.append(func)
            return func(*args, **(kwargs or {}))

    unet.zero_grad()
    loss = F.mse_loss(unet(latents, timesteps, hidden).sample, target)
    with Count():
        loss.backward()
    assert ops == []
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def _train_steps(unet, speed: SpeedChoices | None, optimizer_class, steps: int, latent: int):
    unet.set_attn_processor(SmallHeadsAttnProcessor() if speed and speed.pad_heads else AttnProcessor2_0())
    if speed and speed.fused_geglu:
        assert geglu.fuse(unet) > 0
    enable_checkpointing(unet, speed or SpeedChoices(False, False))
    optimizer = optimizer_class(unet.parameters(), lr=LR, weight_decay=1e-2)
    losses = []
    for step in range(steps):
        latents, timesteps, hidden, target = _inputs(unet, latent, seed=step)
        loss = F.mse_loss(unet(latents, timesteps, hidden).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in unet.state_dict().items()}, optimizer


def test_the_optimised_step_gives_the_loss_and_weights_of_the_plain_one(tiny_model_dir):
    """Padded heads + selective checkpointing + GEGLU's kernel + small tensors stepped together, against
    SDPA + plain checkpointing + diffusers' GEGLU + bitsandbytes' own 8-bit AdamW, over 3 steps at 32x32
    latents."""
    base = _unet(tiny_model_dir)
    plain = _train_steps(copy.deepcopy(base), None, bnb.optim.AdamW8bit, 3, 32)
    fast = _train_steps(copy.deepcopy(base), SpeedChoices(True, True, fused_geglu=True), AdamW8bitTogether, 3, 32)
    assert fast[0] == pytest.approx(plain[0], rel=LOSS_RTOL)
    moved = max((plain[1][k] - base.state_dict()[k]).abs().max().item() for k in plain[1])
    assert moved > LR / 2  # the weights did move (by about lr per step): the comparison means something
    diffs = [(fast[1][k] - plain[1][k]).abs() for k in plain[1]]
    same = sum((d <= CLOSE).sum().item() for d in diffs) / sum(d.numel() for d in diffs)
    worst = max(d.max().item() for d in diffs)
    assert same >= CLOSE_SHARE and worst < WEIGHT_ATOL, f"{same:.4%} the same; max difference {worst:.2e}"
    # Same state as bitsandbytes keeps it: step counts, and 8-bit moments where it has them.
    plain_opt, fast_opt = plain[2], fast[2]
    for p_plain, p_fast in zip(plain_opt.param_groups[0]["params"], fast_opt.param_groups[0]["params"], strict=True):
        a, b = plain_opt.state[p_plain], fast_opt.state[p_fast]
        assert a.keys() == b.keys() and a["step"] == b["step"] == 3
        assert a["state1"].dtype == b["state1"].dtype


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reentrant_checkpointing_gives_the_loss_and_weights_of_the_default_form(tiny_model_dir, method):
    """The engine's choice at 256 tokens on the CPU (re-entrant checkpoints) against diffusers'
    default (non-re-entrant) over 3 steps of torch AdamW. With LoRA the UNet's first layer is
    frozen: without the hook that marks its output, no LoRA weight would get a gradient."""
    base = _unet(tiny_model_dir)
    if method == "lora":
        from peft import LoraConfig

        base.requires_grad_(False)
        base.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trained = {name for name, p in base.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    default = _train_steps(copy.deepcopy(base), SpeedChoices(True, False), torch.optim.AdamW, 3, 16)
    reentrant = _train_steps(copy.deepcopy(base), SpeedChoices(True, False, reentrant_checkpointing=True, fused_geglu=True),
                             torch.optim.AdamW, 3, 16)
    assert reentrant[0] == pytest.approx(default[0], rel=LOSS_RTOL)
    for weights in (default[1], reentrant[1]):  # every trained tensor moved, by about lr a step
        assert min((weights[k] - before[k]).abs().max().item() for k in trained) > LR / 2
    diffs = [(reentrant[1][k] - default[1][k]).abs() for k in default[1]]
    same = sum((d <= CLOSE).sum().item() for d in diffs) / sum(d.numel() for d in diffs)
    worst = max(d.max().item() for d in diffs)
    assert same >= CLOSE_SHARE and worst < WEIGHT_ATOL, f"{same:.4%} the same; max difference {worst:.2e}"


def test_small_tensors_stepped_together_resume_from_a_bitsandbytes_checkpoint():
    """A checkpoint written by bnb's AdamW8bit loads into the faster one and continues identically."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (10, 300, 5000)]  # two small, one 8-bit
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    old, ours = bnb.optim.AdamW8bit(params, lr=1e-2), bnb.optim.AdamW8bit(ref, lr=1e-2)
    for _ in range(2):
        for a, b in zip(params, ref, strict=True):
            a.grad = torch.ones_like(a)
            b.grad = torch.ones_like(b)
        old.step()
        ours.step()
    resumed = AdamW8bitTogether(ref, lr=1e-2)
    resumed.load_state_dict(ours.state_dict())
    for _ in range(2):
        for a, b in zip(params, ref, strict=True):
            a.grad = torch.full_like(a, -0.5)
            b.grad = torch.full_like(b, -0.5)
        old.step()
        resumed.step()
    for a, b in zip(params, ref, strict=True):
        assert (a - b).abs().max().item() < 1e-6
    assert resumed.state[ref[0]]["step"] == 4


def _eight_bit_run(optimizer_class, steps: int = 5):
    torch.manual_seed(0)
    # 8-bit state: whole blocks, a partial last block, a block that stays zero; fp32 state: two small
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in ((64, 32, 3, 3), (257, 33), (5000,), (300,), (10, 10))]
    optimizer = optimizer_class(params, lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (0.01 if step % 2 else 1.0)
            if p.numel() == 5000:
                p.grad[:BLOCK] = 0
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel", [True, False], ids=["engine-kernel", "torch-ops"])
def test_eight_bit_tensors_stepped_together_keep_bitsandbytes_state_byte_for_byte(kernel, threads, monkeypatch):
    """On the CPU the 8-bit tensors are dequantized, updated and quantized back by our code, on the
    engine's kernel (a block of 256 a pass, blocks spread over threads) or in torch operations
    (where it cannot be built): the same codes as bitsandbytes, scales and weights within fp32 rounding."""
    assert cbuild.adamw8bit()[0] is not None, cbuild.adamw8bit()[1]
    if not kernel:
        monkeypatch.setattr(cbuild, "adamw8bit", lambda: (None, "off in this test"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # what the kernel call asks OpenMP for
    (ours, fast), (theirs, plain) = _eight_bit_run(AdamW8bitTogether), _eight_bit_run(bnb.optim.AdamW8bit)
    eight_bit = 0
    for p_fast, p_plain in zip(ours, theirs, strict=True):
        a, b = fast.state[p_fast], plain.state[p_plain]
        assert a["step"] == b["step"] == 5 and a["state1"].dtype == b["state1"].dtype
        if a["state1"].dtype == torch.uint8:
            eight_bit += 1
            assert torch.equal(a["state1"], b["state1"]) and torch.equal(a["state2"], b["state2"])
            assert torch.allclose(a["absmax1"], b["absmax1"], rtol=1e-6, atol=0)
            assert torch.allclose(a["absmax2"], b["absmax2"], rtol=1e-6, atol=0)
        assert (p_fast - p_plain).abs().max().item() < 1e-6
    assert eight_bit == 3
    zero_block = fast.state[ours[2]]  # its first block never had a gradient: scale 0, codes 0
    assert zero_block["absmax1"][0] == zero_block["absmax2"][0] == 0 and zero_block["absmax2"][1:].min() > 0
    assert not zero_block["state1"][:BLOCK].any()


def test_the_quantizer_writes_the_bytes_of_bitsandbytes_kernel():
    """Same fp32 input, same codes and scales: signed (first moment) and unsigned (second) maps."""
    torch.manual_seed(0)
    values = torch.randn(40 * BLOCK) * torch.logspace(-8, 0, 40 * BLOCK)  # every decade of the map
    values[:BLOCK] = 0  # an all-zero block: scale 0, codes 0
    for signed, x in ((True, values), (False, values.abs())):
        code = bnb.functional.create_dynamic_map(signed=signed)  # bitsandbytes' qmap1 and qmap2
        want_codes, want_scales = torch.ops.bitsandbytes.quantize_blockwise(x, code, BLOCK)
        codes = torch.empty(40, BLOCK, dtype=torch.uint8)
        scales = torch.empty(40)
        _quantize_blocks(x.view(40, BLOCK), code, codes, scales)
        assert torch.equal(codes.view(-1), want_codes) and torch.equal(scales, want_scales)
        assert len(set(codes.view(-1).tolist())) > 100  # most of the 256 codes were exercised


def _meta_unet(tiny_model_dir, **changes) -> UNet2DConditionModel:
    config = {**UNet2DConditionModel.load_config(tiny_model_dir, subfolder="unet"), **changes}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize(
    ("device", "changes", "latent", "pad", "selective"),
    [
        ("cpu", {}, 16, True, False),  # 8-channel heads, 256 tokens: pad, plain (re-entrant) checkpointing
        ("cpu", {}, 32, True, True),  # 1,024 tokens: attention outputs kept
        ("cuda", {}, 64, False, True),  # CUDA kernels take any head size
        ("cpu", {"attention_head_dim": 2}, 64, False, True),  # 16-channel heads: nothing to pad
    ],
)
def test_the_choices_follow_device_head_size_and_tokens(tiny_model_dir, device, changes, latent, pad, selective):
    unet = _meta_unet(tiny_model_dir, **changes)
    choices, line = choose(unet, torch.device(device), latent, gradient_checkpointing=True)
    reentrant = device == "cpu" and not selective
    assert choices == SpeedChoices(pad_heads=pad, selective_checkpointing=selective, reentrant_checkpointing=reentrant,
                                   small_head_kernel=pad, fused_geglu=device == "cpu")  # built here (gcc is installed)
    assert ("GEGLU's gelu and product on the engine's CPU kernel" in line) == (device == "cpu")
    assert line.startswith(f"Speed choices on {device}")
    assert ("engine's CPU kernel for small heads" in line) == pad and ("selective" in line) == selective
    assert ("re-entrant" in line) == reentrant
    several, line = choose(unet, torch.device(device), latent, gradient_checkpointing=True, one_process=False)
    assert not several.reentrant_checkpointing and "re-entrant" not in line  # DDP's hooks expect the default
    off, line = choose(unet, torch.device(device), latent, gradient_checkpointing=False)
    assert not off.selective_checkpointing and not off.reentrant_checkpointing and "checkpointing off" in line
    eight_bit, line = choose(unet, torch.device(device), latent, gradient_checkpointing=True, eight_bit=True)
    assert eight_bit.bulk_8bit == eight_bit.adamw8bit_kernel == (device == "cpu")  # built here (gcc)
    assert ("8-bit one on the engine's CPU kernel" in line) == (device == "cpu")


def test_a_run_says_what_it_chose(tiny_model_dir, subject_images, tmp_path):
    events = []
    train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", max_train_steps=1,
                      gradient_checkpointing=True), on_event=events.append)
    said = [e.message for e in events if isinstance(e, PhaseEvent) and e.message.startswith("Speed choices")]
    assert said == ["Speed choices on cpu: attention heads of 8 channels on the engine's CPU kernel for small heads "
                    "(fp32; else padded); "
                    "gradient checkpointing plain, re-entrant (256 tokens: too few to gain from keeping attention; "
                    "the first forward without autograd); "
                    "8-bit AdamW steps its small tensors in one fused call and each 8-bit one on the engine's CPU "
                    "kernel (a block of 256 dequantized, updated and requantized in one pass); "
                    "GEGLU's gelu and product on the engine's CPU kernel (one pass forward, one backward); "
                    f"memory allocator {in_use()}"]  # this test process's own (tests/test_allocator.py)


def test_without_a_compiler_the_engine_pads_heads_and_says_why(tiny_model_dir, tmp_path):
    """A compiler that fails (here `false`), an empty kernel cache: the choice line names the reasons,
    attention falls back to padded SDPA with the same output, 8-bit AdamW to torch operations."""
    script = f"""
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from trainer import geglu, small_heads
from trainer.speed import attention_processor, choose
unet = UNet2DConditionModel.from_pretrained({str(tiny_model_dir)!r}, subfolder="unet")
choices, line = choose(unet, torch.device("cpu"), 16, gradient_checkpointing=True, eight_bit=True)
print(line)
assert choices.pad_heads and not choices.small_head_kernel and small_heads.load() is None
assert choices.bulk_8bit and not choices.adamw8bit_kernel
assert choices.fused_geglu is False and geglu.fuse(unet) == 0
x = torch.randn(1, unet.config.in_channels, 16, 16); h = torch.randn(1, 77, unet.config.cross_attention_dim)
with torch.no_grad():
    unet.set_attn_processor(attention_processor(True)); ours = unet(x, 10, h).sample
    unet.set_attn_processor(AttnProcessor2_0()); plain = unet(x, 10, h).sample
print("difference", (ours - plain).abs().max().item())
"""
    env = {**os.environ, "CC": "false", "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "padded to 16 for the CPU flash kernel (the engine's kernel for small heads is not built: " \
           "false could not build small_heads.c" in done.stdout
    assert "requantized in bulk (the engine's 8-bit AdamW kernel is not built: false could not build adamw8bit.c" \
           in done.stdout
    assert "GEGLU in PyTorch's operations (the engine's GEGLU kernel is not built: false could not build geglu.c" \
           in done.stdout
    assert float(done.stdout.split("difference")[-1]) < 1e-5
    assert not list(tmp_path.rglob("*.so"))


def test_the_kernel_is_built_into_an_empty_cache_and_used_from_it(tmp_path):
    """What a fresh machine does: the first process builds the library into the user's cache, the
    next loads the same file without building."""
    script = (
        "import time; from trainer import small_heads; start = time.perf_counter(); "
        "library = small_heads.load(); print(library._name, round(time.perf_counter() - start, 2), "
        "small_heads.unavailable_reason() or 'built')"
    )
    env = {key: value for key, value in os.environ.items() if key != "CC"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    runs, stamps = [], []
    for _ in range(2):
        runs.append(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
        built = list((tmp_path / "dreambooth-studio" / "kernels").glob("small_heads-*.so"))
        assert len(built) == 1
        stamps.append(built[0].stat().st_mtime_ns)
    assert stamps[0] == stamps[1]  # the second process did not build it again
    assert [run.stdout.split()[0] for run in runs] == [str(built[0])] * 2
    assert list((tmp_path / "dreambooth-studio" / "kernels").iterdir()) == built  # no scratch left behind
