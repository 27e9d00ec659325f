"""What to change when a training does not fit: each change the engine offers, weighed by the memory
model itself, in the order that costs the least quality first; and the check that refuses a training
that would run out of memory an hour in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import ConfigError, TrainConfig
from trainer.memory.estimate import GiB, MemoryEstimate, class_images_to_make, device_capacity, estimate, needed
from trainer.memory.shapes import ModelShapes, read_shapes

RESOLUTION_STEP = 64


@dataclass(frozen=True)
class Change:
    field: str  # the TrainConfig field it changes
    says: str  # what to do, for people
    config: TrainConfig  # the changed config


@dataclass(frozen=True)
class Fitting:
    change: Change
    need: int  # bytes the changed training needs


def single_changes(config: TrainConfig, device_type: str) -> list[Change]:
    """Each saving `config` does not use yet, cheapest first: gradient checkpointing, 8-bit Adam, mixed
    precision, a frozen text encoder, LoRA, batch 1, class images one at a time (a lower resolution is
    searched apart: `lower_resolution`)."""
    changes = []
    if not config.gradient_checkpointing:
        changes.append(
            Change(
                "gradient_checkpointing", "turn on gradient checkpointing", config.replace(gradient_checkpointing=True)
            )
        )
    if not config.use_8bit_adam:
        changes.append(Change("use_8bit_adam", "use 8-bit Adam", config.replace(use_8bit_adam=True)))
    if config.mixed_precision == "no":
        precision = "fp16" if device_type == "cuda" else "bf16"
        changes.append(
            Change(
                "mixed_precision", f"train in {precision} mixed precision", config.replace(mixed_precision=precision)
            )
        )
    if config.train_text_encoder:
        changes.append(
            Change("train_text_encoder", "leave the text encoder frozen", config.replace(train_text_encoder=False))
        )
    if config.method == "full":
        changes.append(Change("method", "train LoRA instead of the whole UNet", config.replace(method="lora")))
    if config.train_batch_size > 1:
        changes.append(Change("train_batch_size", "train with batch size 1", config.replace(train_batch_size=1)))
    if config.sample_batch_size > 1 and class_images_to_make(config):
        changes.append(
            Change("sample_batch_size", "generate class images one at a time", config.replace(sample_batch_size=1))
        )
    return changes


def lower_resolution(config: TrainConfig, device_type: str, capacity: int, shapes: ModelShapes) -> Fitting | None:
    """The highest resolution under `config`'s, in steps of 64 down to half the model's native size,
    at which it fits; None when none does."""
    top = (config.resolution - 1) // RESOLUTION_STEP * RESOLUTION_STEP
    for resolution in range(top, shapes.native_resolution // 2 - 1, -RESOLUTION_STEP):
        lowered = config.replace(resolution=resolution)
        need = needed(estimate(lowered, device_type, shapes=shapes))
        if need <= capacity:
            return Fitting(Change("resolution", f"lower the resolution to {resolution}", lowered), need)
    return None


def fitting_changes(config: TrainConfig, device_type: str, capacity: int, shapes: ModelShapes) -> list[Fitting]:
    """Every single change that makes `config` fit `capacity` bytes, cheapest first."""
    found = []
    for change in single_changes(config, device_type):
        need = needed(estimate(change.config, device_type, shapes=shapes))
        if need <= capacity:
            found.append(Fitting(change, need))
    lowered = lower_resolution(config, device_type, capacity, shapes)
    return found + ([lowered] if lowered else [])


def all_changes(config: TrainConfig, device_type: str) -> TrainConfig:
    """`config` with every saving of `single_changes` at once."""
    merged = config.to_dict()
    for change in single_changes(config, device_type):
        merged.update({k: v for k, v in change.config.to_dict().items() if config.to_dict()[k] != v})
    return TrainConfig.from_dict(merged)


def advice(config: TrainConfig, device_type: str, capacity: int, shapes: ModelShapes) -> str:
    """What would make `config` fit: each single change that does (with what it would need), else all
    of them together, else that the device is too small."""
    fitting = fitting_changes(config, device_type, capacity, shapes)
    if fitting:
        return (
            "Any one of these fits: "
            + "; ".join(f"{f.change.says} (`{f.change.field}`): about {f.need / GiB:.1f} GiB" for f in fitting)
            + "."
        )
    changes = single_changes(config, device_type)
    need = needed(estimate(all_changes(config, device_type), device_type, shapes=shapes))
    every = ", ".join(change.says for change in changes)
    if changes and need <= capacity:
        return f"No single change fits; all of them together ({every}) need about {need / GiB:.1f} GiB."
    return (
        f"Even with every saving{f' ({every})' if changes else ''} it needs about {need / GiB:.1f} GiB: "
        "lower the resolution further or use a device with more memory."
    )


def describe_fit(memory: MemoryEstimate, capacity: int) -> str:
    """ "fits (9.1 of 15.8 GiB)" or "does not fit (19.3 of 15.8 GiB)" """
    verdict = "fits" if needed(memory) <= capacity else "does not fit"
    return f"{verdict} ({needed(memory) / GiB:.1f} of {capacity / GiB:.1f} GiB)"


def check_fits(config: TrainConfig, device: torch.device, *, local_only: bool = False) -> None:
    """Raise ConfigError, before any weight loads, when the predicted peak exceeds what `device` has,
    with the predicted and available memory and the changes that would make it fit."""
    shapes = read_shapes(config.pretrained_model, config.revision, config.pretrained_vae, local_only=local_only)
    memory = estimate(config, device.type, shapes=shapes)
    capacity, where = device_capacity(device)
    if needed(memory) <= capacity:
        return
    raise ConfigError(
        f"the training does not fit {where}: it needs about {needed(memory) / GiB:.1f} GiB at its peak "
        f"({memory.peak_phase}; weights {memory.weights / GiB:.1f}, gradients {memory.gradients / GiB:.1f}, "
        f"optimizer state {memory.optimizer_state / GiB:.1f}, activations {memory.activations / GiB:.1f} GiB). "
        + advice(config, device.type, capacity, shapes)
        + (f" ({'; '.join(memory.notes)})" if memory.notes else "")
    )
