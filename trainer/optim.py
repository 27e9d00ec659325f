"""The optimizer (8-bit AdamW when bitsandbytes imports, torch AdamW otherwise) and LR schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler

from trainer.config import TrainConfig


def sharding_optimizer_note(config: TrainConfig, strategy: str, offload: bool) -> str | None:
    """Why 8-bit AdamW is not used under a strategy that shards the optimizer itself (None: it is).

    DeepSpeed ZeRO and FSDP split the optimizer's state over the GPUs in their own flat buffers, which
    bitsandbytes' blockwise 8-bit state does not follow; with ZeRO's CPU offload the state lives in CPU
    RAM anyway and DeepSpeed's CPU Adam steps it there.
    """
    if strategy not in ("deepspeed", "fsdp") or not config.use_8bit_adam:
        return None
    if strategy == "deepspeed" and offload:
        return ("Optimizer: DeepSpeed's CPU Adam instead of 8-bit AdamW: ZeRO offload keeps the optimizer "
                "state in CPU RAM and steps it there, so the GPU holds none of it.")
    name = "DeepSpeed ZeRO" if strategy == "deepspeed" else "FSDP"
    return (f"Optimizer: torch AdamW instead of 8-bit AdamW: {name} shards the optimizer state across the GPUs "
            "in its own flat buffers, which 8-bit AdamW's blockwise state cannot follow.")


def make_optimizer(
    denoiser_params: list[torch.nn.Parameter],
    text_params: list[torch.nn.Parameter],
    config: TrainConfig,
    warn: Callable[[str], None],
    strategy: str = "ddp",
    offload: bool = False,
) -> torch.optim.Optimizer:
    """One optimizer, one parameter group per model so the text encoder keeps its own LR. `strategy`
    is how accelerate spreads the run (ddp, fsdp, deepspeed); `offload`: ZeRO's optimizer CPU offload."""
    groups = [{"params": denoiser_params, "lr": config.lr}]
    if text_params:
        groups.append({"params": text_params, "lr": config.te_lr})
    kwargs = {
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    note = sharding_optimizer_note(config, strategy, offload)
    if note is not None:
        warn(note)
        if strategy == "deepspeed" and offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except Exception as err:  # an ImportError, or a broken CUDA setup raising at import
            warn(
                f"8-bit AdamW is unavailable (bitsandbytes failed to import: {type(err).__name__}: {err}); "
                "training with torch.optim.AdamW, which keeps 4x more optimizer state. "
                "Install it with `pip install bitsandbytes`."
            )
        else:
            return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    # Counted in optimizer steps: accelerate steps the scheduler once per real optimizer step.
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (what 8-bit Adam shrinks)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
