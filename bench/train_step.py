"""Seconds per training step and peak memory: {torch AdamW, 8-bit AdamW} x {checkpointing off, on}.

    python bench/train_step.py                 # tiny model and the full SD 1.5 UNet (random weights)
    python bench/train_step.py --model tiny    # seconds, not minutes
    python bench/train_step.py --steps 3

Each cell runs in its own process, so peak RSS (and peak CUDA memory on a GPU) is that cell's.
The step is the engine's own: a UNet forward and backward on 64x64 latents (512 px) at batch 1,
gradient clipping, the engine's optimizer, zero_grad(set_to_none=True). The text encoder and VAE
are left out: with cached latents and embeddings a step never runs them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The UNet of Stable Diffusion 1.5 (unet/config.json of the release), built with random weights.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32,
}


def run_cell(model: str, optimizer: str, checkpointing: bool, steps: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from trainer.config import TrainConfig
    from trainer.optim import make_optimizer, optimizer_state_bytes
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_model import UNET_CONFIG  # the tests' tiny model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_UNET if model == "sd15" else UNET_CONFIG)).to(device)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    config = TrainConfig(method="full", use_8bit_adam=optimizer == "adamw8bit")
    notes: list[str] = []
    opt = make_optimizer(list(unet.parameters()), [], config, notes.append)
    size = unet.config.sample_size
    latents = torch.randn(1, 4, size, size, device=device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    times = []
    for _ in range(steps + 1):  # the first step (allocations, kernel choice) is not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        t = torch.randint(0, 1000, (1,), device=device)
        loss = torch.nn.functional.mse_loss(unet(latents, t, hidden).sample, latents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "model": model, "optimizer": optimizer, "checkpointing": checkpointing, "device": str(device),
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "sec_per_step": sum(times[1:]) / steps,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "optimizer_state_mib": optimizer_state_bytes(opt) / 2**20,
        "optimizer_class": type(opt).__name__, "notes": notes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd15", "all"], default="all")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per cell, after one warm-up step")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    args = parser.parse_args()
    if args.cell:
        model, optimizer, ckpt = args.cell.split(",")
        print(json.dumps(run_cell(model, optimizer, ckpt == "on", args.steps)))
        return

    models = ["tiny", "sd15"] if args.model == "all" else [args.model]
    rows = []
    for model in models:
        for optimizer in ("adamw", "adamw8bit"):
            for ckpt in ("off", "on"):
                out = subprocess.run([sys.executable, __file__, "--cell", f"{model},{optimizer},{ckpt}",
                                      "--steps", str(args.steps)], capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"  done {model} {optimizer} ckpt={ckpt}: {row['sec_per_step']:.2f} s/step", file=sys.stderr)

    print(f"device: {rows[0]['device']}; batch 1; {args.steps} timed steps per cell after one warm-up")
    print("| model | params | optimizer | grad ckpt | s/step | peak RSS GiB | peak CUDA GiB | optimizer state MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cuda = f"{r['peak_cuda_gib']:.2f}" if r["peak_cuda_gib"] is not None else "-"
        print(f"| {r['model']} | {r['params_m']:.1f} M | {r['optimizer_class']} | {'on' if r['checkpointing'] else 'off'} "
              f"| {r['sec_per_step']:.3f} | {r['peak_rss_gib']:.2f} | {cuda} | {r['optimizer_state_mib']:.1f} |")
    for model in models:
        base = next(r for r in rows if r["model"] == model and r["optimizer"] == "adamw" and not r["checkpointing"])
        for r in rows:
            if r["model"] == model and r is not base:
                print(f"{model}: {r['optimizer']} ckpt={'on' if r['checkpointing'] else 'off'} vs adamw ckpt=off: "
                      f"time x{r['sec_per_step'] / base['sec_per_step']:.2f}, "
                      f"RSS x{r['peak_rss_gib'] / base['peak_rss_gib']:.2f}, "
                      f"optimizer state x{r['optimizer_state_mib'] / max(base['optimizer_state_mib'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
