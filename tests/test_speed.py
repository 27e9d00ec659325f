"""Selective gradient checkpointing (trainer/speed.py) skips recomputing attention, and nothing else changes."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.speed import enable_checkpointing, selective

SDPA = {name for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math")}


class CountAttention(TorchDispatchMode):
    """Counts the attention kernels the dispatcher runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SDPA:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _step(unet: UNet2DConditionModel, latent: int) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward and backward; the loss, the gradients, and the attention calls of the backward."""
    torch.manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, latent, latent)
    context = torch.randn(1, 7, unet.config.cross_attention_dim)
    loss = torch.nn.functional.mse_loss(unet(x, 500, context).sample, x)
    with CountAttention() as counted:
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}, counted.calls


@pytest.fixture(scope="module")
def unet(tiny_model_dir) -> UNet2DConditionModel:
    model = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    model.train()
    return model


def test_selective_checkpointing_keeps_attention_and_gives_plain_checkpointings_gradients(unet):
    latent = 32  # 1,024 tokens at the first attention block: selective
    plain, kept = copy.deepcopy(unet), copy.deepcopy(unet)
    plain.enable_gradient_checkpointing()
    line = enable_checkpointing(kept, latent)
    assert "selective" in line and "1024 tokens" in line
    plain_loss, plain_grads, plain_calls = _step(plain, latent)
    kept_loss, kept_grads, kept_calls = _step(kept, latent)
    assert plain_calls > 0, "plain checkpointing recomputes each attention in the backward pass"
    assert kept_calls == 0, "selective checkpointing must not recompute attention"
    assert kept_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == kept_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_small_latents_keep_plain_checkpointing(unet):
    model = copy.deepcopy(unet)
    line = enable_checkpointing(model, 16)  # 256 tokens
    assert "plain" in line and "256 tokens" in line
    assert _step(model, 16)[2] > 0
    assert not selective(unet.config, 16, True) and selective(unet.config, 32, True)
    assert not selective(unet.config, 32, False)  # checkpointing off: nothing to be selective about
