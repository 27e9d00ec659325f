"""Where the app runs: the accelerator, the Hugging Face Space around it, and the demo model.

Everything here is read once at start-up and is cheap (no model is loaded): the UI uses it to
pick safe defaults and to tell the visitor plainly what this machine can do.
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

log = logging.getLogger(__name__)

DEMO_MODEL = "tiny-demo"  # the value the model lists use for the locally built tiny model
DEMO_RESOLUTION = 32  # the tiny model's native image size (16x16 latents)
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


def safe_defaults(hw: Hardware) -> dict[str, Any]:
    """Form values that fit this machine: the documented memory recipes of diffusers' scripts."""
    if hw.device != "cuda":
        # No CUDA: no 8-bit Adam, no fp16 autocast; the tiny demo model is the only sane default.
        return {
            "base_model": DEMO_MODEL,
            "method": "lora",
            "mixed_precision": "no",
            "use_8bit_adam": False,
            "gradient_checkpointing": False,
            "resolution": DEMO_RESOLUTION,
            "train_batch_size": 1,
        }
    memory = hw.memory_gb or 0.0
    return {
        "base_model": next(iter(KNOWN_MODELS)),
        # Full fine-tuning of SD 1.x fits 16 GB only with 8-bit Adam + checkpointing; LoRA fits 8 GB.
        "method": "full" if memory >= 20 else "lora",
        "mixed_precision": "bf16" if hw.bf16 else "fp16",
        "use_8bit_adam": memory < 40,
        "gradient_checkpointing": memory < 24,
        "resolution": 512,
        "train_batch_size": 2 if memory >= 40 else 1,
    }


def default_resolution(base_model: str) -> int:
    if base_model == DEMO_MODEL:
        return DEMO_RESOLUTION
    return KNOWN_MODELS.get(base_model, 512)


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
    """The tiny base model, built on first use (a few seconds, no network), never at import."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir) / "tiny-sd"
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return (self.path / "model_index.json").is_file()

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
        """Map the demo entry of a model list to its folder; leave every other id alone."""
        return str(self.ensure()) if model.strip() == DEMO_MODEL else model.strip()
