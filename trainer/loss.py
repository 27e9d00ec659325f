"""The training objectives: what a step adds to the latents, what the denoiser must predict, how rows weigh.

A family owns its objective (trainer/families): Stable Diffusion 1.x/2.x and SDXL learn DDPM's
denoising (epsilon or v-prediction, optionally min-SNR weighted); SD 3 and FLUX learn rectified flow
(flow matching). The loop asks the objective and never which one it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

from trainer.config import TrainConfig


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    instance: float
    prior: float | None


@dataclass(frozen=True)
class Noised:
    """A batch's noisy latents, the timesteps the denoiser is told, what it must predict, and each row's
    loss weight (None: all 1)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None

    def doubled(self, target: torch.Tensor) -> Noised:
        """The same noisy rows twice, the second time with `target` (base-prediction preservation)."""
        weights = None if self.weights is None else torch.cat([self.weights, self.weights])
        return Noised(torch.cat([self.noisy, self.noisy]), torch.cat([self.timesteps, self.timesteps]),
                      torch.cat([self.target, target.to(self.target.dtype)]), weights)


def row_noise(latents: torch.Tensor, offset_noise: float, gen: torch.Generator) -> torch.Tensor:
    """One row's noise from its own generator (one per row: see trainer/data/batches.py)."""
    noise = torch.randn(latents.shape[1:], generator=gen)
    if offset_noise > 0:
        # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift mean brightness.
        noise = noise + offset_noise * torch.randn((latents.shape[1], 1, 1), generator=gen)
    return noise


class Denoising:
    """DDPM: noise added at a uniformly drawn timestep; the target by the scheduler's prediction type."""

    def noised(self, scheduler, latents: torch.Tensor, gens: list[torch.Generator], config: TrainConfig) -> Noised:
        noise, timesteps = noise_and_timesteps(latents, scheduler.config.num_train_timesteps, config.offset_noise, gens)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        weights = None
        if config.snr_gamma is not None:
            # Min-SNR-gamma (Hang et al. 2023): cap the weight of low-noise timesteps.
            snr = compute_snr(scheduler, timesteps)
            denom = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
            weights = torch.clamp(snr, max=config.snr_gamma) / denom
        return Noised(noisy, timesteps, target_for(scheduler, latents, noise, timesteps), weights)


class FlowMatching:
    """Rectified flow (SD 3, FLUX): σ drawn by the config's weighting scheme (diffusers'
    `compute_density_for_timestep_sampling`) and mapped through the scheduler's own (shifted) sigmas;
    noisy = (1 − σ)·x + σ·ε, target ε − x, rows weighted by `compute_loss_weighting_for_sd3`."""

    def noised(self, scheduler, latents: torch.Tensor, gens: list[torch.Generator], config: TrainConfig) -> Noised:
        count = scheduler.config.num_train_timesteps
        noises, indices = [], []
        for gen in gens:
            noises.append(row_noise(latents, config.offset_noise, gen))
            u = compute_density_for_timestep_sampling(config.weighting_scheme, 1, logit_mean=config.logit_mean,
                                                      logit_std=config.logit_std, mode_scale=config.mode_scale,
                                                      generator=gen)
            indices.append((u * count).long().clamp(0, count - 1))
        index = torch.cat(indices)
        noise = torch.stack(noises).to(latents.device, latents.dtype)
        sigmas = scheduler.sigmas[index].to(latents.device, torch.float32)
        timesteps = scheduler.timesteps[index].to(latents.device)
        sigma = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        noisy = (1.0 - sigma) * latents + sigma * noise
        weights = compute_loss_weighting_for_sd3(config.weighting_scheme, sigmas)
        return Noised(noisy, timesteps, noise - latents, weights)


def noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, offset_noise: float, gens: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's noise and timestep from its own generator (one per row: see trainer/data/batches.py)."""
    noises, timesteps = [], []
    for gen in gens:
        noises.append(row_noise(latents, offset_noise, gen))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=gen))
    return torch.stack(noises).to(latents.device, latents.dtype), torch.cat(timesteps).to(latents.device)


def target_for(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"`pretrained_model`: unsupported scheduler prediction_type {prediction_type!r}")


def dreambooth_loss(model_pred: torch.Tensor, noised: Noised, n_instance: int, config: TrainConfig) -> LossParts:
    """Mean-squared error per row, weighted by the objective; class rows form the prior loss."""
    per_row = F.mse_loss(model_pred.float(), noised.target.float(), reduction="none")
    per_row = per_row.mean(dim=tuple(range(1, per_row.ndim)))
    if noised.weights is not None:
        per_row = per_row * noised.weights.to(per_row.device, per_row.dtype)
    instance = per_row[:n_instance].mean()
    if per_row.shape[0] == n_instance:
        return LossParts(total=instance, instance=instance.item(), prior=None)
    prior = per_row[n_instance:].mean()
    total = instance + config.prior_loss_weight * prior
    return LossParts(total=total, instance=instance.item(), prior=prior.item())
