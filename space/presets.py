"""What the app offers on a given machine: the base models it lists and the settings that fit.

The toy model is trainer.toyworld's tiny Stable Diffusion, pretrained on a world of coloured
shapes and shipped in trainer/assets/toy-sd. It trains on a CPU with no network, so it is listed
first when there is no CUDA GPU or the Hub is switched off. If its folder is missing, the app
says so (space.texts.TOY_MISSING) rather than offer something else in its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from space import texts
from space.hardware import Hardware
from trainer.config import ConfigError
from trainer.run_folder import PIPELINE_INDEX, try_read_config
from trainer.toyworld import EXAMPLE_SETTINGS, TOY_MODEL_DIR, TOY_MODEL_LABEL, TOY_RESOLUTION

TOY_MODEL = "toy-demo"  # the value the model lists use for the toy model
# Known base models, smallest memory first; the value is what the engine loads.
KNOWN_MODELS: dict[str, int] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 512,
    "CompVis/stable-diffusion-v1-4": 512,
    "stabilityai/stable-diffusion-2-1-base": 512,
    "stabilityai/stable-diffusion-2-1": 768,
}


@dataclass(frozen=True)
class ToyModel:
    """The toy base model's folder (tests point it at a stand-in); nothing here loads it."""

    folder: Path = TOY_MODEL_DIR

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def installed(self) -> bool:
        return (self.folder / PIPELINE_INDEX).is_file()

    def resolve(self, model: str) -> str:
        """Map the toy entry of a model list to its folder; leave every other id alone."""
        model = model.strip()
        if model != TOY_MODEL:
            return model
        if not self.installed:
            raise ConfigError(texts.TOY_MISSING.format(folder=self.folder))
        return str(self.folder)

    def is_toy(self, source: str) -> bool:
        """The toy entry of a model list, or a run trained on it (its config names the folder)."""
        if source == TOY_MODEL:
            return True
        config = try_read_config(Path(source))
        return config is not None and Path(config.pretrained_model) == self.folder

    def native_size(self, source: str) -> int | None:
        """The image size the toy model, or a run trained on it, samples at; None for anything else."""
        if not self.is_toy(source):
            return None
        config = try_read_config(Path(source))  # None for the toy entry itself
        return config.resolution if config is not None else TOY_RESOLUTION


def toy_first(hw: Hardware, offline: bool) -> bool:
    """Without CUDA, or without the Hub, the toy model is the only base model that will work."""
    return hw.device != "cuda" or offline


def safe_defaults(hw: Hardware, offline: bool = False) -> dict[str, Any]:
    """Form values that fit this machine: the documented memory recipes of diffusers' scripts."""
    if hw.device != "cuda":
        # No CUDA: no 8-bit Adam, no fp16 autocast; the toy model (below) is the only sane default.
        defaults: dict[str, Any] = {
            "method": "lora",
            "mixed_precision": "no",
            "use_8bit_adam": False,
            "gradient_checkpointing": False,
            "train_batch_size": 1,
        }
    else:
        memory = hw.memory_gb or 0.0
        defaults = {
            "base_model": next(iter(KNOWN_MODELS)),
            # Full fine-tuning of SD 1.x fits 16 GB only with 8-bit Adam + checkpointing; LoRA fits 8 GB.
            "method": "full" if memory >= 20 else "lora",
            "mixed_precision": "bf16" if hw.bf16 else "fp16",
            "use_8bit_adam": memory < 40,
            "gradient_checkpointing": memory < 24,
            "resolution": 512,
            "train_batch_size": 2 if memory >= 40 else 1,
        }
    if toy_first(hw, offline):
        defaults.update(base_model=TOY_MODEL, resolution=TOY_RESOLUTION)
    return defaults


def default_resolution(base_model: str) -> int:
    if base_model == TOY_MODEL:
        return TOY_RESOLUTION
    return KNOWN_MODELS.get(base_model, 512)


def model_settings(base_model: str) -> dict[str, Any]:
    """Engine settings a base model wants beyond what the form shows: the toy model learns from
    scratch-sized weights and samples in few steps (trainer.toyworld's EXAMPLE_SETTINGS say how)."""
    return dict(EXAMPLE_SETTINGS) if base_model.strip() == TOY_MODEL else {}


def model_choices(hw: Hardware, offline: bool) -> list[tuple[str, str]]:
    """(label, value) of the Train tab's base models: the toy model first where it is the only
    one that will work, last otherwise."""
    known = [(model_id, model_id) for model_id in KNOWN_MODELS]
    toy = (TOY_MODEL_LABEL, TOY_MODEL)
    return [toy, *known] if toy_first(hw, offline) else [*known, toy]
