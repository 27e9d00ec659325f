"""The accelerator a run trains under, and what this machine can run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, ProjectConfiguration, parse_flag_from_env

from trainer.config import ConfigError, TrainConfig
from trainer.run_folder import logs_dir

TRACKER_PROJECT = "dreambooth"


def check_runtime(config: TrainConfig) -> None:
    """What this machine cannot do for the config, said before anything loads."""
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        # accelerate would silently train in fp32 here; say so instead.
        raise ConfigError("`mixed_precision` fp16 needs a CUDA GPU; on this machine use 'bf16' or 'no'")
    if config.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("`report_to` wandb needs the wandb package: `pip install wandb`, or use 'tensorboard'")


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def deepspeed_without_gpu() -> bool:
    """`accelerate launch` started DeepSpeed on a machine without a GPU (how the tests run ZeRO here).
    accelerate 1.15 finds no process-group backend for DeepSpeed there and gives every process a run of
    its own on the whole batch; over gloo they train together, as they would over NCCL."""
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and launched and not torch.cuda.is_available()


def sharding_launch() -> bool:
    """`accelerate launch` was told to run DeepSpeed or FSDP (known before the accelerator is made)."""
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") or parse_flag_from_env("ACCELERATE_USE_FSDP")


def use_cpu() -> bool:
    """Train on the CPU although an accelerator may be there: `accelerate launch --cpu` asked for it, or
    several processes were launched on a machine without a GPU. accelerate 1.15 reads neither from the
    environment itself, and without it each launched process would train alone on the whole batch.
    (DeepSpeed is the exception: accelerate drops it from a run it was told is on the CPU.)"""
    if deepspeed_without_gpu():
        return False
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    return _launched() and not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place among the launched ones (set up once per process, as the run will use it)."""
    if deepspeed_without_gpu():
        return PartialState(backend="gloo")
    return PartialState(cpu=use_cpu())


def strategy(accelerator: Accelerator) -> tuple[str, bool]:
    """How accelerate spreads this run: "ddp" (also one process), "fsdp" or "deepspeed"; and whether
    DeepSpeed offloads the optimizer state to the CPU (from the accelerate config's ZeRO section)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        device = (zero.get("offload_optimizer") or {}).get("device", "none")
        return "deepspeed", device not in ("none", None)
    if kind == DistributedType.FSDP:
        return "fsdp", False
    return "ddp", False


def make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    # accelerate keeps one AcceleratorState per process; a second train() in the same process
    # (the app, the tests) must start from a clean one. The distributed PartialState is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    process_state()  # the process group first, on the backend chosen there
    accelerator = Accelerator(
        cpu=use_cpu(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(logs_dir(run_dir))),
    )
    if config.report_to != "none":
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(config))
    return accelerator


def _tracker_config(config: TrainConfig) -> dict[str, str | int | float | bool]:
    """Trackers take flat scalars. TrainConfig holds no secret (the Hub token never enters it)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, bool | int | float | str):
            flat[key] = value
        elif value is not None:
            flat[key] = json.dumps(value)
    return flat
