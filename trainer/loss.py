"""The denoising loss: noise, timesteps, target by prediction type, min-SNR, prior split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from trainer.config import TrainConfig


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    instance: float
    prior: float | None


def noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, offset_noise: float, gens: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's noise and timestep from its own generator (one per row: see trainer/data/batches.py)."""
    noises, timesteps = [], []
    for gen in gens:
        noise = torch.randn(latents.shape[1:], generator=gen)
        if offset_noise > 0:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift mean brightness.
            noise = noise + offset_noise * torch.randn((latents.shape[1], 1, 1), generator=gen)
        noises.append(noise)
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=gen))
    return torch.stack(noises).to(latents.device, latents.dtype), torch.cat(timesteps).to(latents.device)


def target_for(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"`pretrained_model`: unsupported scheduler prediction_type {prediction_type!r}")


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    n_instance: int,
    noise_scheduler,
    config: TrainConfig,
) -> LossParts:
    """Mean-squared error per row, optionally min-SNR weighted; class rows form the prior loss."""
    per_row = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma is not None:
        # Min-SNR-gamma (Hang et al. 2023): cap the weight of low-noise timesteps.
        snr = compute_snr(noise_scheduler, timesteps)
        capped = torch.clamp(snr, max=config.snr_gamma)
        denom = snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr
        per_row = per_row * (capped / denom)
    instance = per_row[:n_instance].mean()
    if per_row.shape[0] == n_instance:
        return LossParts(total=instance, instance=instance.item(), prior=None)
    prior = per_row[n_instance:].mean()
    total = instance + config.prior_loss_weight * prior
    return LossParts(total=total, instance=instance.item(), prior=prior.item())
