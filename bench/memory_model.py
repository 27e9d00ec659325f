"""The memory model (trainer/memory/estimate.py) against measured peaks: predicted vs measured peak RSS of real
training steps on this CPU, and the model's predictions for SD 1.5 on CUDA.

    OMP_NUM_THREADS=1 python bench/memory_model.py                    # every cell (~20 min on 2 cores)
    OMP_NUM_THREADS=1 python bench/memory_model.py --model tiny mid   # minutes
    python bench/memory_model.py --table-from rows.json              # rows saved with --json, predicted anew
    python bench/memory_model.py --cuda-only                          # only the SD 1.5 CUDA predictions

Cells: tiny, mid and the SD 1.5 UNet (random weights) x {full, LoRA} x gradient checkpointing {off,
on} at batch 1, and the SDXL UNet with LoRA at 512 px with checkpointing. tiny is the tests' tiny SD
(tests/tiny_model.py, 16x16 latents), mid bench/vs_reference.py's MID_UNET (~18 M parameters, 64x64
latents), sd15 bench/train_step.py's SD15_UNET (859.5 M, 64x64 latents = 512 px), sdxl its SDXL_UNET
(2.6 B, 64x64 latents = 512 px). All fp32 with the engine's 8-bit AdamW, LoRA rank 4.

Each cell is its own process, running bench/train_step.py's step (UNet forward and backward, clipping,
the engine's optimizer, zero_grad) with the engine's checkpointing (trainer/speed.py: selective at
1,024 tokens or more), one warm-up step then --steps more. The
child reports its RSS after its imports (the baseline) and ru_maxrss at the end (the peak).

The prediction is `trainer.memory.estimate.estimate` of the same training on "cpu", keeping what the cell holds:
its training-step phase without the text encoders' and VAE's weights and the caches (the cell builds
only the UNet and feeds random text states), plus the measured baseline and the model's CPU
overhead (the first step's library pages, the heap's slack, oneDNN/MKL repacking; its two factors
were fitted on these cells, see trainer/memory/estimate.py). The ratio is predicted / measured; the target is
within 15% (0.85-1.15).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]

from train_step import SD15_UNET, SDXL_UNET, build_step, failure_reason, step_inputs, time_steps  # noqa: E402
from vs_reference import MID_UNET  # noqa: E402

MODELS = ("tiny", "mid", "sd15", "sdxl")
STEPS = {"tiny": 2, "mid": 2, "sd15": 1, "sdxl": 1}  # timed steps after the warm-up one
LORA_RANK = 4
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def shapes_of(model: str):
    """The model's ModelShapes: its UNet with the tiny model's text encoder and VAE (tiny, mid: 2x
    VAE) or the release's (sd15, sdxl)."""
    import tiny_model

    from trainer.families import family_by_name
    from trainer.memory.shapes import KNOWN_CONFIGS, ModelShapes

    if model in ("sd15", "sdxl"):
        family = "sd" if model == "sd15" else "sdxl"
        unet = SD15_UNET if model == "sd15" else SDXL_UNET
        return ModelShapes(family_by_name(family), {**KNOWN_CONFIGS[family], "unet": dict(unet)})
    unet = tiny_model.UNET_CONFIG if model == "tiny" else MID_UNET
    return ModelShapes(
        family_by_name("sd"),
        {"unet": dict(unet), "text_encoder": dict(tiny_model.TEXT_ENCODER_CONFIG), "vae": dict(tiny_model.VAE_CONFIG)},
    )


def cell_config(cell: dict):
    from trainer.config import TrainConfig

    shapes = shapes_of(cell["model"])
    return TrainConfig(
        method=cell["method"],
        lora_rank=LORA_RANK,
        gradient_checkpointing=cell["checkpointing"],
        use_8bit_adam=True,
        mixed_precision="no",
        train_batch_size=1,
        resolution=cell["latents"] * shapes.vae_scale_factor,
    )


def plan(models: list[str]) -> list[dict]:
    cells = []
    for model in models:
        latents = 16 if model == "tiny" else 64
        combos = [("lora", True)] if model == "sdxl" else [(m, c) for m in ("full", "lora") for c in (False, True)]
        for method, checkpointing in combos:
            cells.append(
                {
                    "model": model,
                    "method": method,
                    "checkpointing": checkpointing,
                    "latents": latents,
                    "optimizer": "adamw8bit",
                    "precision": "fp32",
                    "rank": LORA_RANK,
                }
            )
    return cells


# --- the child: one cell ---------------------------------------------------------------------------
def run_cell(cell: dict, steps: int) -> dict:
    """bench/train_step.py's step with the engine's checkpointing; RSS after imports and at the end."""
    import bitsandbytes  # noqa: F401  (imported here so that the baseline holds every library the step uses)
    import peft  # noqa: F401
    import torch

    from trainer.optim import make_optimizer  # noqa: F401
    from trainer.speed import enable_checkpointing

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device = torch.device("cpu")
    unet_config = shapes_of(cell["model"]).configs["unet"]
    setup = build_step(cell, unet_config, device)
    if cell["checkpointing"]:
        enable_checkpointing(setup.unet, cell["latents"])
    times, failed = time_steps(setup, step_inputs(setup.unet, cell["latents"], device), steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **cell,
        "baseline": baseline,
        "peak_rss": peak,
        "failed": failed,
        "notes": setup.notes,
        "sec_per_step": sum(times[1:]) / max(1, len(times) - 1),
    }


def run_cell_process(cell: dict) -> dict:
    steps = STEPS[cell["model"]]
    out = subprocess.run(
        [sys.executable, __file__, "--cell", json.dumps(cell), "--steps", str(steps)],
        capture_output=True,
        text=True,
    )
    try:
        row = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        row = {**cell, "failed": failure_reason(out)}
    what = row.get("failed") or f"peak RSS {row['peak_rss'] / 2**30:.2f} GiB"
    print(
        f"  done {cell['model']} {cell['method']} ckpt={'on' if cell['checkpointing'] else 'off'}: {what}",
        file=sys.stderr,
        flush=True,
    )
    return row


# --- the prediction -------------------------------------------------------------------------------
def predict(cell: dict, baseline: int) -> tuple[int, str]:
    """Predicted peak RSS of the cell's process, and the training-step line of the estimate."""
    from trainer.memory.estimate import CPU_PROCESS, TRAINING, device_overhead, estimate

    shapes = shapes_of(cell["model"])
    memory = estimate(cell_config(cell), "cpu", shapes=shapes)
    others = sum(v for k, v in memory.weights_by_part.items() if k != "unet")
    step = memory.phases[TRAINING] - others - memory.caches
    unet = memory.weights_by_part["unet"]
    transient = step - unet - memory.optimizer_state
    overhead = device_overhead("cpu", transient, unet) - CPU_PROCESS
    return baseline + step + overhead, (
        f"unet {unet / 2**30:.2f} + grads {memory.gradients / 2**30:.2f} + "
        f"optimizer {memory.optimizer_state / 2**30:.2f} + activations {memory.activations / 2**30:.2f} GiB"
    )


def cuda_predictions() -> list[str]:
    """The model's SD 1.5 predictions on CUDA: 512 px, fp16, 8-bit AdamW, checkpointing, batch 1 with
    prior preservation (4 class images a batch), full and LoRA; no GPU measured them here."""
    from trainer.config import TrainConfig
    from trainer.memory.estimate import GiB, estimate
    from trainer.memory.shapes import read_shapes

    shapes = read_shapes(SD15_ID, local_only=True, family="sd")
    lines = [
        "| SD 1.5, 512 px, fp16, 8-bit AdamW, checkpointing, batch 1 + prior | predicted peak GiB "
        "| of which: weights, gradients, optimizer, step activations | peak phase |",
        "|---|---|---|---|",
    ]
    for method in ("full", "lora"):
        config = TrainConfig(
            pretrained_model=SD15_ID,
            method=method,
            mixed_precision="fp16",
            use_8bit_adam=True,
            gradient_checkpointing=True,
            train_batch_size=1,
            with_prior_preservation=True,
            class_prompt="a photo of a dog",
            resolution=512,
        )
        m = estimate(config, "cuda", shapes=shapes)
        lines.append(
            f"| {method} | {m.peak_accelerator / GiB:.2f} | {m.weights / GiB:.2f}, {m.gradients / GiB:.2f}, "
            f"{m.optimizer_state / GiB:.2f}, {m.activations / GiB:.2f} | {m.peak_phase} |"
        )
    if shapes.fallback:
        lines.append(f"\n({shapes.fallback}.)")
    return lines


def print_table(rows: list[dict]) -> None:
    cores = os.cpu_count()
    print(
        f"{datetime.date.today()}; {platform.machine()}, {cores} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; fp32, 8-bit AdamW, batch 1, LoRA rank {LORA_RANK}"
    )
    print(
        "| model | method | grad ckpt | latents | baseline GiB | predicted peak RSS GiB | measured GiB "
        "| predicted / measured | prediction |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (
            f"| {r['model']} | {r['method']} | {'on' if r['checkpointing'] else 'off'} | {r['latents']}x{r['latents']} "
        )
        if r.get("failed"):
            print(head + f"| - | - | {r['failed']} | - | - |")
            continue
        predicted, parts = predict(r, r["baseline"])
        print(
            head + f"| {r['baseline'] / 2**30:.2f} | {predicted / 2**30:.2f} | {r['peak_rss'] / 2**30:.2f} "
            f"| {predicted / r['peak_rss']:.3f} | {parts} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--cuda-only", action="store_true", help="only print the SD 1.5 CUDA predictions")
    parser.add_argument("--json", type=Path, help="also write the measured rows to this file")
    parser.add_argument("--table-from", type=Path, help="measure nothing: the table of rows written by --json")
    parser.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON), print JSON
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell), args.steps)))
        return
    if args.table_from:  # the predictions of today's model against rows measured before
        print_table(json.loads(args.table_from.read_text()))
        return
    if not args.cuda_only:
        rows = [run_cell_process(cell) for cell in plan(args.model)]
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        print_table(rows)
        print()
    print("\n".join(cuda_predictions()))


if __name__ == "__main__":
    main()
