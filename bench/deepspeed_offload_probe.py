"""Does ZeRO-Offload's CPU Adam step like torch AdamW? A plain accelerate + DeepSpeed script, no trainer.

    accelerate launch --use_deepspeed --zero_stage 2 --offload_optimizer_device cpu --num_processes 2 \
        --mixed_precision no bench/deepspeed_offload_probe.py
    (and again with --offload_optimizer_device none, where DeepSpeed steps torch AdamW)

Each process trains a small MLP on its own row of a 2-row batch for one step with small gradients;
beside it, one torch AdamW steps a copy on both rows (what DDP averaging gives). One Adam step moves
every weight by about the learning rate, in the direction of its gradient, so the share of weights
that moved the other way is the finding. Printed for weight decay 0 and 1e-2. Measured on the 2-core
CPU (DeepSpeed 0.19.8, 2 processes over gloo): offload, decay 0: 0% moved the other way,
max difference 7.5e-9; offload, decay 1e-2: 5.7% the other way, max difference 1.9e-2 (about 2 × lr);
no offload: 0% at both. The signature is of decay added to the gradient (L2) instead of to the weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.runtime import process_state  # noqa: E402  (gloo where there is no GPU, as the engine does)

LR = 1e-2


def mlp() -> torch.nn.Module:
    layers = [torch.nn.Linear(64, 160)]
    for _ in range(30):
        layers += [torch.nn.GELU(), torch.nn.Linear(160, 160)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(160, 64))


def one_step(weight_decay: float) -> tuple[float, float]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator()
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = 1
    offload = (ds["zero_optimization"].get("offload_optimizer") or {}).get("device") == "cpu"
    torch.manual_seed(0)
    model, reference = mlp(), mlp()
    reference.load_state_dict(model.state_dict())
    reference.to(accelerator.device)
    x, y = torch.randn(2, 64, device=accelerator.device), torch.randn(2, 64, device=accelerator.device)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(model.parameters(), lr=LR, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=weight_decay)
    plain = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=weight_decay)
    start = [p.detach().clone() for p in reference.parameters()]
    model, optimizer = accelerator.prepare(model, optimizer)
    row = accelerator.process_index % 2
    accelerator.backward(1e-6 * (model(x[row:row + 1]) - y[row:row + 1]).pow(2).mean())
    optimizer.step()
    (1e-6 * (reference(x) - y).pow(2).mean(dim=1).mean()).backward()
    plain.step()
    trained = accelerator.unwrap_model(model).parameters()
    moved = torch.cat([(a.detach() - s).flatten() for a, s in zip(trained, start, strict=True)])
    wanted = torch.cat([(b.detach() - s).flatten() for b, s in zip(reference.parameters(), start, strict=True)])
    other_way = (moved.sign() != wanted.sign()).float().mean().item()
    return other_way, (moved - wanted).abs().max().item()


def main() -> None:
    process_state()
    results = [(decay, *one_step(decay)) for decay in (0.0, 1e-2)]
    from accelerate import PartialState

    if PartialState().is_main_process:
        from accelerate import Accelerator

        ds = Accelerator().state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        print(f"ZeRO stage {ds.get('stage')}, optimizer offload: {(ds.get('offload_optimizer') or {}).get('device')}")
        for decay, other_way, worst in results:
            print(f"weight decay {decay:g}: {other_way:.1%} of weights moved the other way from torch AdamW; "
                  f"max difference {worst:.2g} (lr {LR:g})")


if __name__ == "__main__":
    main()
