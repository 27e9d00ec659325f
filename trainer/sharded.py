"""Checkpoints and whole weights when accelerate shards the run (DeepSpeed ZeRO, FSDP).

Under DDP every process holds the whole model and optimizer, so the main process alone writes a
checkpoint in our own format (trainer/checkpoints.py). Under DeepSpeed ZeRO each process holds only
its part of the optimizer state, and under FSDP its part of every weight too: every process then
writes its part with accelerate's `save_state` (and reads it back with `load_state`), and the main
process adds the LR schedule and state.json, which makes the folder complete. Saving the final
weights or drawing samples under FSDP gathers the weights whole on the main process first.

DeepSpeed ZeRO-2 runs in the tests on this project's CPU-only machines (over gloo: runtime.py
`deepspeed_without_gpu`, tests/test_deepspeed.py). FSDP has not run here: accelerate 1.15 sets it up
only for GPU-like devices (see the README's "More than one GPU").
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from trainer.checkpoints import STATE, TrainingState, prune
from trainer.config import ConfigError, TrainConfig
from trainer.run_folder import checkpoints_dir

SHARDED = "sharded"  # the state.json key that marks a checkpoint written by save_state


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def fit_deepspeed_config(accelerator: Accelerator, config: TrainConfig) -> None:
    """Tell DeepSpeed the batch it steps on and the run's gradient clipping (DeepSpeed clips inside its
    own step). accelerate reads the micro-batch from a dataloader passed to `prepare`, and the run
    prepares none: its batches are its own (trainer/data/batches.py)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    theirs = ds.get("gradient_accumulation_steps")
    if isinstance(theirs, int) and theirs != config.gradient_accumulation_steps:
        raise ConfigError(f"`gradient_accumulation_steps` is {config.gradient_accumulation_steps} but the accelerate "
                          f"DeepSpeed config says {theirs}; set both to the same number "
                          "(configs/accelerate/zero2_offload.yaml)")
    ds["train_micro_batch_size_per_gpu"] = config.train_batch_size
    ds["train_batch_size"] = config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    ds["gradient_clipping"] = config.max_grad_norm


def half_precision_forward(accelerator: Accelerator) -> contextlib.AbstractContextManager:
    """Under DeepSpeed with fp16 or bf16 the engine holds the UNet in that dtype (the fp32 master
    weights are its optimizer's) and accelerate's autocast stands aside, so the run's fp32 latents would
    meet half-precision weights in the first layer. torch's autocast casts them there, as accelerate's
    own wrapper does for DDP."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED or accelerator.mixed_precision not in ("fp16", "bf16"):
        return contextlib.nullcontext()
    dtype = torch.float16 if accelerator.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(accelerator.device.type, dtype=dtype)


def is_sharded_checkpoint(path: Path) -> bool:
    return bool(json.loads((path / STATE).read_text()).get(SHARDED))


def save_checkpoint(run_dir: Path, state: TrainingState, accelerator: Accelerator, lr_scheduler,
                    keep: int | None, protect: int | None = None) -> Path:
    """Every process calls this at the same step; the folder is renamed complete by the main one, which then
    prunes as the one-process path does (trainer/checkpoints.py `prune`: the `keep` newest, and the checkpoint of
    step `protect`, the pick so far, besides them)."""
    root = checkpoints_dir(run_dir)
    final = root / f"checkpoint-{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE).write_text(json.dumps({"step": state.step, "text_encoder_frozen": state.text_encoder_frozen,
                                            "samples_seen": state.samples_seen, SHARDED: True,
                                            "processes": accelerator.num_processes}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune(run_dir, keep, protect)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator: Accelerator, lr_scheduler) -> TrainingState:
    """Every process reads its part back (the number of processes may differ only where the backend
    can reshard: FSDP's sharded state can, DeepSpeed's ZeRO checkpoints cannot)."""
    info = json.loads((path / STATE).read_text())
    accelerator.load_state(str(path))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    seen = info.get("samples_seen")
    return TrainingState(step=int(info["step"]), text_encoder_frozen=bool(info["text_encoder_frozen"]),
                         samples_seen=None if seen is None else int(seen))


def check_resumable(path: Path, accelerator: Accelerator) -> None:
    """A checkpoint resumes under the kind of run that wrote it: sharded state cannot be read by a
    DDP run, nor a whole-model checkpoint loaded into a sharded optimizer; and DeepSpeed's ZeRO state
    only on as many processes as wrote it (each holds its own part of the optimizer)."""
    if is_sharded_checkpoint(path) != is_sharded(accelerator):
        wrote = "DeepSpeed/FSDP" if is_sharded_checkpoint(path) else "one process or DDP"
        raise ConfigError(f"`resume_from_checkpoint`: {path.name} was written by a {wrote} run; resume it "
                          "with the same kind of `accelerate launch` configuration")
    wrote_on = json.loads((path / STATE).read_text()).get("processes")
    if (accelerator.distributed_type == DistributedType.DEEPSPEED and wrote_on is not None
            and wrote_on != accelerator.num_processes):
        raise ConfigError(f"`resume_from_checkpoint`: {path.name} holds DeepSpeed ZeRO state split over {wrote_on} "
                          f"processes; resume it with `--num_processes {wrote_on}` (this run has "
                          f"{accelerator.num_processes})")


@contextlib.contextmanager
def whole_weights(accelerator: Accelerator, modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Under FSDP, every process enters this together and the main process sees each weight whole
    inside it (to save or to sample); elsewhere the weights are whole already."""
    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with contextlib.ExitStack() as stack:
        for module in modules:
            if isinstance(module, FullyShardedDataParallel):
                stack.enter_context(FullyShardedDataParallel.summon_full_params(module, writeback=False,
                                                                                rank0_only=True))
        yield
