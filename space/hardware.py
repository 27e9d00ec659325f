"""Where the app runs: the accelerator, the Hugging Face Space around it, and the demo models.

Everything here is read once at start-up and is cheap (no model is loaded): the UI uses it to
pick safe defaults and to tell the visitor plainly what this machine can do.

The demo model is the toy Stable Diffusion of trainer.toyworld (pretrained on a world of coloured
shapes, shipped in trainer/assets/toy-sd) when that folder is there, else a tiny random model
built on first use. Either way it trains on a CPU with no network, and is listed first when
there is no CUDA GPU or the Hub is switched off.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, TrainConfig
from trainer.toyworld import EXAMPLE_SETTINGS, TOY_MODEL_DIR, TOY_MODEL_LABEL, TOY_RESOLUTION

log = logging.getLogger(__name__)

DEMO_MODEL = "tiny-demo"  # the value the model lists use for the locally built tiny model
DEMO_RESOLUTION = 32  # the tiny model's native image size (16x16 latents)
DEMO_MODEL_LABEL = "Tiny demo model (built locally, runs on CPU)"
TOY_MODEL = "toy-demo"  # the value the model lists use for the toy model of trainer/assets/toy-sd
# Known base models, smallest memory first; the value is what the engine loads.
KNOWN_MODELS: dict[str, int] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 512,
    "CompVis/stable-diffusion-v1-4": 512,
    "stabilityai/stable-diffusion-2-1-base": 512,
    "stabilityai/stable-diffusion-2-1": 768,
}


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda", "mps" or "cpu"
    name: str
    memory_gb: float | None
    bf16: bool = False

    @property
    def has_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def label(self) -> str:
        if self.device == "cpu":
            return f"CPU only ({os.cpu_count()} cores), no GPU found"
        memory = f", {self.memory_gb:.0f} GB" if self.memory_gb else ""
        return f"{self.name}{memory}"


def detect_hardware() -> Hardware:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, props.total_memory / 2**30, torch.cuda.is_bf16_supported())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Hardware("mps", "Apple GPU (MPS)", None)
    return Hardware("cpu", "CPU", None)


def hub_offline() -> bool:
    """True when the Hub is switched off (HF_HUB_OFFLINE, as huggingface_hub reads it). Probing the
    network at start-up would make building the UI slow and flaky, so the flag is all we ask."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def demo_first(hw: Hardware, offline: bool) -> bool:
    """Without CUDA, or without the Hub, the demo model is the only base model that will work."""
    return hw.device != "cuda" or offline


def safe_defaults(hw: Hardware, demo_model: str = DEMO_MODEL, offline: bool = False) -> dict[str, Any]:
    """Form values that fit this machine: the documented memory recipes of diffusers' scripts."""
    if hw.device != "cuda":
        # No CUDA: no 8-bit Adam, no fp16 autocast; the demo model (below) is the only sane default.
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
    if demo_first(hw, offline):
        defaults.update(base_model=demo_model, resolution=default_resolution(demo_model))
    return defaults


def default_resolution(base_model: str) -> int:
    if base_model == TOY_MODEL:
        return TOY_RESOLUTION
    if base_model == DEMO_MODEL:
        return DEMO_RESOLUTION
    return KNOWN_MODELS.get(base_model, 512)


def model_settings(base_model: str) -> dict[str, Any]:
    """Engine settings a base model wants beyond what the form shows: the toy model learns from
    scratch-sized weights and samples in few steps (trainer.toyworld's EXAMPLE_SETTINGS say how)."""
    return dict(EXAMPLE_SETTINGS) if base_model.strip() == TOY_MODEL else {}


@dataclass(frozen=True)
class SpaceInfo:
    """The Hugging Face Space this app runs in, if any (the platform sets SPACE_ID)."""

    space_id: str | None
    persistent_storage: bool

    @property
    def duplicate_url(self) -> str | None:
        return f"https://huggingface.co/spaces/{self.space_id}?duplicate=true" if self.space_id else None


def detect_space() -> SpaceInfo:
    return SpaceInfo(os.environ.get("SPACE_ID") or None, Path("/data").is_dir())


def default_runs_dir(space: SpaceInfo) -> Path:
    """Runs survive restarts only on a Space's persistent storage, mounted at /data."""
    env = os.environ.get("DREAMBOOTH_RUNS_DIR")
    if env:
        return Path(env)
    if space.space_id and space.persistent_storage:
        return Path("/data/runs")
    return Path("runs")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dreambooth-studio"


class DemoModel:
    """The demo base model: the shipped toy model when its folder is there, else the tiny random
    model, built on first use (a few seconds, no network), never at import."""

    def __init__(self, cache_dir: Path, toy_dir: Path = TOY_MODEL_DIR) -> None:
        self.path = Path(cache_dir) / "tiny-sd"
        self.toy_dir = Path(toy_dir)
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return (self.path / "model_index.json").is_file()

    @property
    def has_toy(self) -> bool:
        """The toy model is shipped with the engine; until it is, the tiny model stands in."""
        return (self.toy_dir / "model_index.json").is_file()

    @property
    def key(self) -> str:
        """The model lists' value for the demo model."""
        return TOY_MODEL if self.has_toy else DEMO_MODEL

    @property
    def label(self) -> str:
        return TOY_MODEL_LABEL if self.has_toy else DEMO_MODEL_LABEL

    def is_demo(self, source: str) -> bool:
        """A demo entry of a model list, or a run trained on one (its config names the folder)."""
        if source in (DEMO_MODEL, TOY_MODEL):
            return True
        config = Path(source) / "config.json"
        return config.is_file() and self.base_of(config) in (self.path, self.toy_dir)

    @staticmethod
    def base_of(config: Path) -> Path | None:
        """The base model folder a run's config.json names (None when unreadable)."""
        try:
            return Path(TrainConfig.load(config).pretrained_model)
        except ConfigError:
            return None

    def ensure(self) -> Path:
        with self._lock:
            if not self.built:
                from trainer.tiny import build_tiny_pipeline  # imported here: it pulls in diffusers

                log.info("Building the tiny demo model in %s", self.path)
                # Build aside, then rename: a half-written folder never looks like a model.
                scratch = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
                shutil.rmtree(scratch, ignore_errors=True)
                build_tiny_pipeline(scratch)
                shutil.rmtree(self.path, ignore_errors=True)
                scratch.rename(self.path)
        return self.path

    def resolve(self, model: str) -> str:
        """Map the demo entries of a model list to their folders; leave every other id alone."""
        model = model.strip()
        if model == TOY_MODEL:
            if not self.has_toy:
                raise ConfigError(f"The toy demo model is not installed: {self.toy_dir} has no model_index.json.")
            return str(self.toy_dir)
        return str(self.ensure()) if model == DEMO_MODEL else model


def model_choices(hw: Hardware, demo: DemoModel, offline: bool) -> list[tuple[str, str]]:
    """(label, value) of the Train tab's base models: the demo model first where it is the only
    one that will work, last otherwise."""
    known = [(model_id, model_id) for model_id in KNOWN_MODELS]
    entry = (demo.label, demo.key)
    return [entry, *known] if demo_first(hw, offline) else [*known, entry]
