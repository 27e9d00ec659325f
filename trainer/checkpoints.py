"""Resumable checkpoints: trainable weights, optimizer, LR schedule, step; written atomically.

Only trainable tensors are stored (the frozen base model is reloaded on resume), so a LoRA
checkpoint is megabytes, not the whole UNet. Data order and noise are derived from (seed,
step) in `batches.py`, so the step number is all the data-loader state a resume needs.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError
from .families import ModelFamily
from .models import load_trainable_state_dict, trainable_state_dict
from .run_folder import checkpoints_dir

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE = "state.json"


@dataclass(frozen=True)
class TrainingState:
    """What is checkpointed besides the weights."""

    step: int
    text_encoder_frozen: bool


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder is complete once its state.json exists."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise ConfigError(f"`resume_from_checkpoint`: {path} is not a complete checkpoint (no {STATE})")
    return path


def save_checkpoint(
    run_dir: Path,
    state: TrainingState,
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    keep: int | None,
) -> Path:
    """Write into a temporary folder and rename it: a killed process leaves no checkpoint that
    looks complete. state.json is written last, so even a partial copy is never 'complete'."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state_dict(unet), tmp / "unet.safetensors")
    for name, text_encoder in zip(ModelFamily.text_encoder_names(len(text_encoders)), text_encoders, strict=True):
        save_file(trainable_state_dict(text_encoder), tmp / f"{name}.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / STATE).write_text(json.dumps({"step": state.step, "text_encoder_frozen": state.text_encoder_frozen}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
) -> TrainingState:
    """Restore a checkpoint; `text_encoders` are the trained ones (none when they are frozen)."""
    info = json.loads((path / STATE).read_text())
    load_trainable_state_dict(unet, load_file(path / "unet.safetensors"), "UNet")
    for name, text_encoder in zip(ModelFamily.text_encoder_names(len(text_encoders)), text_encoders, strict=True):
        te_file = path / f"{name}.safetensors"
        if not te_file.is_file():
            raise ConfigError(f"`resume_from_checkpoint`: {path} has no {name} weights, but this run trains it")
        load_trainable_state_dict(text_encoder, load_file(te_file), name.replace("_", " "))
    # weights_only: a checkpoint is data, never code.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return TrainingState(step=int(info["step"]), text_encoder_frozen=bool(info["text_encoder_frozen"]))


def _rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
