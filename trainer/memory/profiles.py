"""The parts as each phase of a run holds them, and the activation profile of each phase.

Training: the parts as `prepare_for_training` leaves them (frozen in the mixed-precision dtype,
trainable in fp32, LoRA added, checkpointing as trainer/speed.py sets it). Class images: as loaded
(fp32), on CUDA with the UNet and text encoders cast to the mixed-precision dtype, as
trainer.loop.prepare_class_images does. Encoding: the VAE alone.

A profile is traced once per architecture and settings and kept for the process. The profiles of
the known architectures (trainer/memory/shapes.py) on CUDA ship in trainer/assets, so the app
sizes an SD 1.5 or SDXL training instantly; `python -m trainer.memory.profiles` adds missing ones,
`--fresh` remakes them all (after a change to the engine's setup or step; tests/test_memory.py has
a slow test that compares one with a fresh trace).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.families import Components
from trainer.memory.shapes import ModelShapes, build_parts, known_shapes, pristine_parts
from trainer.memory.trace import Profile, cuda_autocast_norms, fakeify, generation, profile, training_step, vae_encoding
from trainer.models import prepare_for_training, weight_dtype
from trainer.speed import selective

PROFILES_FILE = Path(__file__).resolve().parent.parent / "assets" / "memory-profiles.json"
_CACHE: dict[str, Profile] = {}
_SHIPPED_LOADED = False
# Grid the shipped profiles are pruned on: batches of 1-8 (x2 with prior preservation), latents 8-256.
_GRID_ROWS, _GRID_SIDES = range(1, 17), range(8, 257, 8)


@dataclass(frozen=True)
class StepSettings:
    """What a training step's activations depend on."""

    method: str
    lora_rank: int
    train_text_encoder: bool
    gradient_checkpointing: bool
    half: bool  # fp16 and bf16 take the same bytes
    device_type: str
    selective: bool  # selective checkpointing (trainer/speed.py)

    @classmethod
    def of(cls, shapes: ModelShapes, config: TrainConfig, device_type: str) -> StepSettings:
        unet = pristine_parts(shapes).denoiser
        latent = config.resolution // shapes.vae_scale_factor
        return cls(
            config.method,
            config.lora_rank if config.method == "lora" else 0,
            config.train_text_encoder,
            config.gradient_checkpointing,
            config.mixed_precision != "no",
            device_type,
            selective(unet.config, latent, config.gradient_checkpointing),
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without diffusers' warning that casting a model with `to()` may differ from loading it in a
    dtype: true, and said once by the training itself, not at every estimate."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def training_parts(shapes: ModelShapes, config: TrainConfig) -> Components:
    """The parts on the meta device as the engine trains them."""
    parts = build_parts(shapes)
    with _quiet():
        prepare_for_training(parts, config, torch.device("meta"))
    return parts


def generation_parts(shapes: ModelShapes, mixed_precision: str, device_type: str) -> Components:
    """The parts on the meta device as class images are made: as loaded, on CUDA the UNet and text
    encoders in the mixed-precision dtype (the VAE stays fp32)."""
    parts = build_parts(shapes)
    with _quiet():
        for module in (parts.denoiser, *parts.text_encoders) if device_type == "cuda" else ():
            module.to(dtype=weight_dtype(mixed_precision))
    return parts


def _autocast(mixed_precision: str):
    dtype = weight_dtype(mixed_precision)
    return (lambda: torch.autocast("cpu", dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext


def _cached(key: str) -> Profile | None:
    _load_shipped()
    return _CACHE.get(key)


def _traced(
    key: str, parts: Components, modules: list[torch.nn.Module], phase_of, unit: int, cuda: bool, one_row: bool
) -> Profile:
    """Trace and keep the profile of `key`: fake parameters, CUDA's norms where traced for CUDA, the phase."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    params = fakeify(modules, mode)
    if cuda:
        cuda_autocast_norms(modules)
    _CACHE[key] = profile(phase_of(parts), params, mode, unit, one_row)
    return _CACHE[key]


def _unit(shapes: ModelShapes) -> int:
    return 2 ** (len(shapes.configs["unet"]["block_out_channels"]) - 1)


def step_profile(
    shapes: ModelShapes, config: TrainConfig, device_type: str, one_row: bool
) -> Profile:
    settings = StepSettings.of(shapes, config, device_type)
    key = json.dumps(["step", shapes.key, *vars(settings).values(), one_row])
    if (found := _cached(key)) is not None:
        return found
    parts = training_parts(shapes, config)
    precision = config.mixed_precision if settings.half else "no"
    return _traced(
        key,
        parts,
        [parts.denoiser, *parts.text_encoders, parts.vae],
        lambda p: training_step(p, config.train_text_encoder, _autocast(precision)),
        _unit(shapes),
        device_type == "cuda",
        one_row,
    )


def generation_profile(
    shapes: ModelShapes, mixed_precision: str, device_type: str, one_row: bool
) -> Profile:
    """Class images and samples. On the CPU the engine generates in fp32 without autocast."""
    precision = mixed_precision if device_type == "cuda" else "no"
    half = precision != "no"
    key = json.dumps(["generation", shapes.key, half, device_type, one_row])
    if (found := _cached(key)) is not None:
        return found
    parts = generation_parts(shapes, precision, device_type)
    return _traced(
        key,
        parts,
        [parts.denoiser, *parts.text_encoders, parts.vae],
        lambda p: generation(p, _autocast(precision)),
        _unit(shapes),
        device_type == "cuda",
        one_row,
    )


def encoding_profile(shapes: ModelShapes, mixed_precision: str) -> Profile:
    """The VAE encode of one photo (the engine encodes them one at a time), in the VAE's dtype."""
    bf16 = mixed_precision == "bf16"  # the only case where prepare_for_training casts the VAE
    key = json.dumps(["encoding", shapes.key, bf16])
    if (found := _cached(key)) is not None:
        return found
    parts = build_parts(shapes)
    parts.vae.requires_grad_(False)
    with _quiet():
        parts.vae.to(dtype=torch.bfloat16 if bf16 else torch.float32)
    return _traced(
        key, parts, [parts.vae], lambda p: vae_encoding(p, shapes.vae_scale_factor), _unit(shapes), False, one_row=True
    )


# --- the shipped profiles ------------------------------------------------------------------------
def _load_shipped() -> None:
    global _SHIPPED_LOADED
    if _SHIPPED_LOADED:
        return
    _SHIPPED_LOADED = True
    if PROFILES_FILE.is_file():
        data = json.loads(PROFILES_FILE.read_text(encoding="utf-8"))
        for key, value in data["profiles"].items():
            _CACHE.setdefault(key, Profile.from_dict(value))


def shipped_configs(family: str) -> list[tuple[str, TrainConfig]]:
    """The settings whose CUDA profiles ship: what the app's preset picker weighs for a family, at its
    native resolution and default LoRA rank, under mixed precision, batch 1 and 2 with prior."""
    from trainer.families import family_by_name

    rank = {"sd": 4, "sdxl": 16}[family]
    resolution = family_by_name(family).default_resolution
    configs = []
    for method in ("full", "lora"):
        for te in (True, False):
            for ckpt in (True, False):
                configs.append(
                    (
                        family,
                        TrainConfig(
                            method=method,
                            lora_rank=rank,
                            train_text_encoder=te,
                            gradient_checkpointing=ckpt,
                            mixed_precision="fp16",
                            resolution=resolution,
                        ),
                    )
                )
    return configs


def write_shipped(families: tuple[str, ...] = ("sd", "sdxl"), fresh: bool = False) -> None:
    """Trace the shipped profiles that are missing (all of them when `fresh`: after a change to the
    engine's setup or step; minutes, SDXL's step is ~60,000 ops a trace) and write the file."""
    global _SHIPPED_LOADED
    if fresh:
        _SHIPPED_LOADED = True  # the file is what is being remade
        _CACHE.clear()
    keys = set()
    for name in families:
        shapes = known_shapes(name, "shipped")
        keys.add(shapes.key)
        for precision in ("fp16", "bf16"):
            encoding_profile(shapes, precision)
        for _family, config in shipped_configs(name):
            what = f"{name} {config.method} te={config.train_text_encoder} ckpt={config.gradient_checkpointing}"
            print(what, file=sys.stderr, flush=True)
            for one_row in (True, False):
                step_profile(shapes, config, "cuda", one_row)
                generation_profile(shapes, "fp16", "cuda", one_row)
    sides = [s * s for s in _GRID_SIDES]
    profiles = {k: v.pruned(_GRID_ROWS, sides).to_dict() for k, v in _CACHE.items() if json.loads(k)[1] in keys}
    about = "trainer/memory/profiles.py; remake with `python -m trainer.memory.profiles [--fresh]`"
    text = json.dumps({"about": about, "families": sorted(families), "profiles": profiles}, indent=0)
    PROFILES_FILE.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_shipped(fresh="--fresh" in sys.argv[1:])
