"""The base models the app offers on a given machine, and what each brings: family, size, LoRA rank,
learning rate.

The toy model is trainer.toyworld's tiny Stable Diffusion, pretrained on a world of coloured
shapes and shipped in trainer/assets/toy-sd. It trains on a CPU with no network, so it is listed
first when there is no CUDA GPU or the Hub is switched off. If its folder is missing, the app
says so (space.texts.TOY_MISSING) rather than offer something else in its place.

Each known base model names its family (trainer.families: "sd" or "sdxl") and native size; a
family brings its own learning rates and LoRA rank; what fits the GPU, and the form values that
follow from it, are space.hardware_fit's. The family of a model the table does not know is read
from its model_index.json only where that is on this disk (a folder, or the Hub cache): the page
never waits on the network to guess it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from space import texts
from space.hardware import Hardware
from trainer.config import DEFAULT_LR, ConfigError, TrainConfig, UserError
from trainer.families import FAMILIES, family_by_name, family_for_class, read_model_index
from trainer.run_folder import PIPELINE_INDEX, try_read_config
from trainer.toyworld import (
    EXAMPLE_SETTINGS,
    TOY_MODEL_DIR,
    TOY_MODEL_LABEL,
    TOY_RESOLUTION,
)

TOY_MODEL = "toy-demo"  # the value the model lists use for the toy model
TOY_CLASS_BATCH = int(EXAMPLE_SETTINGS["sample_batch_size"])  # its 32 px class images: many at once
SD, SDXL, SD3, FLUX = "sd", "sdxl", "sd3", "flux"  # trainer.families' names of the families the app lists models of


class KnownModel(NamedTuple):
    family: str  # a trainer.families name
    resolution: int  # the size it was trained at, which it samples best at
    steps: int | None = None  # denoising steps it was distilled for, where not its family's (FLUX.1-schnell: 4)


# Known base models, smallest memory first (SDXL last); the key is what the engine loads.
KNOWN_MODELS: dict[str, KnownModel] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": KnownModel(SD, 512),
    "CompVis/stable-diffusion-v1-4": KnownModel(SD, 512),
    "stabilityai/stable-diffusion-2-1-base": KnownModel(SD, 512),
    "stabilityai/stable-diffusion-2-1": KnownModel(SD, 768),
    "stabilityai/stable-diffusion-xl-base-1.0": KnownModel(SDXL, 1024),
    "stabilityai/stable-diffusion-3.5-medium": KnownModel(SD3, 1024),
    "stabilityai/stable-diffusion-3.5-large": KnownModel(SD3, 1024),
    "black-forest-labs/FLUX.1-dev": KnownModel(FLUX, 1024),
    "black-forest-labs/FLUX.1-schnell": KnownModel(FLUX, 1024, steps=4),
}


@dataclass(frozen=True)
class FamilyPreset:
    """The training settings a family starts from (the visitor may change them)."""

    learning_rate: dict[str, float]  # by method
    lora_rank: int


FAMILY_PRESETS: dict[str, FamilyPreset] = {
    # diffusers' train_dreambooth.py / train_dreambooth_lora.py: 5e-6 full, 1e-4 LoRA at rank 4.
    SD: FamilyPreset(dict(DEFAULT_LR), TrainConfig.lora_rank),
    # LoRA: diffusers' train_dreambooth_lora_sdxl README trains at 1e-4, as for SD. Rank 16, not the
    # script's default 4: SDXL's attention is wider (1280 channels in 60 of its 70 transformer
    # blocks) and a 1024 px subject has more detail to keep; community SDXL DreamBooth recipes use
    # 16-32. The file stays small: ~1.45M parameters per rank, ~90 MB in fp32 at 16.
    # Full: 5e-6, as diffusers' DreamBooth default for SD. Its SDXL full fine-tuning example uses
    # 1e-6, but over thousands of captioned images; a few photos over a few hundred steps need the
    # DreamBooth rate, and the larger UNet overfits no slower, so no reason to go above SD's.
    SDXL: FamilyPreset({"lora": 1e-4, "full": 5e-6}, 16),
    # diffusers' train_dreambooth_lora_flux / _sd3 READMEs train their LoRAs at 1e-4; rank 16 as for SDXL
    # (ai-toolkit's and SimpleTuner's FLUX defaults are 16; 4 is diffusers' script default). SD 3 full: the
    # DreamBooth rate. FLUX is never fine-tuned in full here (about 120 GB: trainer/families/flow.py).
    SD3: FamilyPreset({"lora": 1e-4, "full": 5e-6}, 16),
    FLUX: FamilyPreset({"lora": 1e-4, "full": 5e-6}, 16),
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
        if source == TOY_MODEL:
            return TOY_RESOLUTION
        config = try_read_config(Path(source))
        return config.resolution if config is not None and Path(config.pretrained_model) == self.folder else None


def toy_first(hw: Hardware, offline: bool) -> bool:
    """Without CUDA, or without the Hub, the toy model is the only base model that will work."""
    return hw.device != "cuda" or offline


# --- a base model's family ------------------------------------------------------------------
def model_family(base_model: str) -> str | None:
    """The family name of a base model: the toy model and known ids from the table, others from
    their model_index.json when it is on this disk; None when unknown or not one we train."""
    base_model = base_model.strip()
    if base_model == TOY_MODEL:
        return SD  # a Stable Diffusion pipeline, only small
    if base_model in KNOWN_MODELS:
        return KNOWN_MODELS[base_model].family
    if not base_model:
        return None
    try:  # a folder, or a Hub id in the local cache: never the network
        index = read_model_index(base_model, cached_only=True)
        return family_for_class(index.get("_class_name"), base_model).name
    except (UserError, ValueError):  # not on disk, not a repo id, or a pipeline we do not train
        return None


def model_resolution(base_model: str) -> int | None:
    """The size a base model trains and samples best at; None when the app cannot tell."""
    base_model = base_model.strip()
    if base_model == TOY_MODEL:
        return TOY_RESOLUTION
    if base_model in KNOWN_MODELS:
        return KNOWN_MODELS[base_model].resolution
    family = model_family(base_model)
    return family_by_name(family).default_resolution if family else None


def default_resolution(base_model: str) -> int:
    return model_resolution(base_model) or FAMILIES[0].default_resolution


def lora_rank_for(base_model: str) -> int | None:
    """The LoRA rank a base model starts from: the toy world's, or its family's."""
    if base_model.strip() == TOY_MODEL:
        return int(EXAMPLE_SETTINGS["lora_rank"])
    family = model_family(base_model)
    return FAMILY_PRESETS[family].lora_rank if family in FAMILY_PRESETS else None


def model_kind(base_model: str) -> str | None:
    """What a base model's presets follow: "toy", its family's name, or None when unknown."""
    return "toy" if base_model.strip() == TOY_MODEL else model_family(base_model)


def first_model(family: str) -> str:
    return next(model_id for model_id, known in KNOWN_MODELS.items() if known.family == family)


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
