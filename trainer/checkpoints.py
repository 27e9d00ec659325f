"""Resumable checkpoints: trainable weights, optimizer, LR schedule, step; written atomically.

Only trainable tensors are stored (the frozen base model is reloaded on resume), so a LoRA
checkpoint is megabytes, not the whole denoiser. Data order and noise are derived from (seed,
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

from trainer import atomic
from trainer.config import ConfigError
from trainer.model_files import text_encoder_names
from trainer.models import load_trainable_state_dict, trainable_state_dict
from trainer.run_folder import checkpoints_dir

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE = "state.json"


@dataclass(frozen=True)
class TrainingState:
    """What is checkpointed besides the weights."""

    step: int
    text_encoder_frozen: bool
    # Samples taken so far (trainer/data/batches.py): lets a checkpoint resume on another number of
    # processes; None in checkpoints written before it was kept (then step × the global batch).
    samples_seen: int | None = None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder is complete once its state.json exists."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def checkpoint_steps(run_dir: Path) -> set[int]:
    """The steps of the run's complete checkpoints on disk."""
    return {checkpoint_step(p) for p in list_checkpoints(run_dir)}


def checkpoint_for_step(run_dir: Path, step: int) -> Path | None:
    return next((p for p in list_checkpoints(run_dir) if checkpoint_step(p) == step), None)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """'latest', a checkpoint folder, or the name of one of the run's own checkpoints: diffusers'
    scripts take `checkpoint-4` relative to the output folder, and people who come from them type it
    so (our folders are zero-padded, checkpoint-000004: the step is what is matched)."""
    if resume is None:
        return None
    found = list_checkpoints(run_dir)
    if resume == "latest":
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file() and len(path.parts) == 1 and (named := _NAME.match(resume)):
        by_step = {checkpoint_step(p): p for p in found}
        path = by_step.get(int(named.group(1)), path)
    if not (path / STATE).is_file():
        have = ", ".join(p.name for p in found) if found else "none"
        raise ConfigError(f"`resume_from_checkpoint`: {path} is not a complete checkpoint (no {STATE}); give "
                          f"'latest', a checkpoint folder, or one of this run's checkpoints ({have})",
                          field="resume_from_checkpoint")
    return path


def save_checkpoint(
    run_dir: Path,
    state: TrainingState,
    denoiser: tuple[str, torch.nn.Module],
    text_encoders: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    keep: int | None,
    protect: int | None = None,
) -> Path:
    """Write into a temporary folder and rename it: a killed process leaves no checkpoint that
    looks complete. state.json is written last, so even a partial copy is never 'complete'. A write
    that fails (a full disk) removes the temporary folder and raises an OSError naming the checkpoint;
    the earlier checkpoints stay as they were. `keep` counts the newest checkpoints kept; the one of step
    `protect` (the best so far, trainer/scores/pick.py) is kept besides them."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    _remove_unfinished(root)
    tmp.mkdir()
    with atomic.cleaned_up(tmp, final):
        name, module = denoiser  # the pipeline's name for it: unet, transformer
        save_file(trainable_state_dict(module), tmp / f"{name}.safetensors")
        for name, text_encoder in zip(text_encoder_names(len(text_encoders)), text_encoders, strict=True):
            save_file(trainable_state_dict(text_encoder), tmp / f"{name}.safetensors")
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(_rng_state(), tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps({"step": state.step, "text_encoder_frozen": state.text_encoder_frozen,
                                            "samples_seen": state.samples_seen}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    prune(run_dir, keep, protect)
    return final


def prune(run_dir: Path, keep: int | None, protect: int | None = None) -> None:
    """Delete all but the `keep` newest checkpoints (None: keep all), except the one of step `protect` (the
    pick so far, trainer/scores/pick.py), which is kept besides them. Both kinds of checkpoint prune here:
    this module's and the sharded ones (trainer/sharded.py)."""
    if keep is None:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        if checkpoint_step(old) != protect:
            _discard(old)


def _torch_save(obj: object, path: Path) -> None:
    """torch.save through a Python file: a failed write then carries the OSError that caused it (a full
    disk), where torch's own file writer says only "unexpected pos"."""
    with path.open("wb") as file:
        torch.save(obj, file)


def _discard(checkpoint: Path) -> None:
    """Renamed, then deleted: a kill mid-delete leaves a hidden folder, never a checkpoint missing files."""
    trash = checkpoint.with_name(f".old-{checkpoint.name}")
    atomic.remove(trash)
    checkpoint.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_unfinished(root: Path) -> None:
    """What a killed or failed save left: unfinished (.tmp-) and half-deleted (.old-) folders."""
    for leftover in root.glob(".tmp-checkpoint-*"):
        atomic.remove(leftover)
    for leftover in root.glob(".old-checkpoint-*"):
        atomic.remove(leftover)


def load_denoiser(path: Path, name: str, module: torch.nn.Module) -> None:
    """The checkpoint's trainable weights of the denoiser (the pipeline's `name` for it: unet, transformer)."""
    file = path / f"{name}.safetensors"
    if not file.is_file():
        raise ConfigError(f"`resume_from_checkpoint`: {path} has no {name} weights: it was made from another "
                          "kind of base model")
    load_trainable_state_dict(module, load_file(file), name)


def load_checkpoint(
    path: Path,
    denoiser: tuple[str, torch.nn.Module],
    text_encoders: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
) -> TrainingState:
    """Restore a checkpoint; `text_encoders` are the trained ones (none when they are frozen)."""
    info = json.loads((path / STATE).read_text())
    load_denoiser(path, *denoiser)
    for name, text_encoder in zip(text_encoder_names(len(text_encoders)), text_encoders, strict=True):
        te_file = path / f"{name}.safetensors"
        if not te_file.is_file():
            raise ConfigError(f"`resume_from_checkpoint`: {path} has no {name} weights, but this run trains it")
        load_trainable_state_dict(text_encoder, load_file(te_file), name.replace("_", " "))
    # weights_only: a checkpoint is data, never code.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    seen = info.get("samples_seen")
    return TrainingState(step=int(info["step"]), text_encoder_frozen=bool(info["text_encoder_frozen"]),
                         samples_seen=None if seen is None else int(seen))


def _rng_state() -> dict[str, object]:
    state: dict[str, object] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
