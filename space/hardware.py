"""Where the app runs: the accelerator, and the Hugging Face Space around it.

Everything here is read once at start-up and is cheap (no model is loaded). What the app makes
of it (default settings, the base models it lists) is space.presets'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
    import torch  # here, not at import: the tests build Hardware values without it

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
