"""Selective against plain gradient checkpointing on a real UNet: seconds per step and peak memory.

    OMP_NUM_THREADS=1 python bench/checkpointing.py                  # SD 1.5's UNet, 512 px, LoRA
    OMP_NUM_THREADS=1 python bench/checkpointing.py --family sdxl    # SDXL's UNet, 1024 px (slow)

The UNet is built from the family's config (trainer/memory/shapes.py) with random weights, frozen,
rank-4 LoRA on its attention projections as the engine adds them, batch 1, fp32, AdamW. Each mode
runs in a fresh child process (so peak RSS is its own): one warm-up step, then --steps timed steps;
the modes are interleaved --repeats times and the medians printed, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("plain", "selective")


def child(family: str, mode: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from peft import LoraConfig

    from trainer.memory.shapes import known_shapes
    from trainer.speed import selective_checkpoint

    torch.manual_seed(0)
    shapes = known_shapes(family, "benchmark")
    config = dict(shapes.configs["unet"])
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if mode == "selective":
        unet.enable_gradient_checkpointing(selective_checkpoint)
    else:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = shapes.native_resolution // shapes.vae_scale_factor
    latents = torch.randn(1, config["in_channels"], side, side)
    context = torch.randn(1, 77, config["cross_attention_dim"])
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        out = unet(latents, torch.tensor([500]), context, **extra).sample
        torch.nn.functional.mse_loss(out, latents).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return {"s_per_step": statistics.median(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd", "sdxl"), default="sd")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.family, args.child, args.steps)))
        return
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--family", args.family, "--steps", str(args.steps), "--child", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(out))
            print(mode, results[mode][-1], flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    for mode, values in med.items():
        print(f"{mode:10s} {values['s_per_step']:.2f} s/step  peak RSS {values['peak_rss_mib']:.0f} MiB")
    print(f"selective / plain: time {med['selective']['s_per_step'] / med['plain']['s_per_step']:.3f}, "
          f"peak RSS {med['selective']['peak_rss_mib'] / med['plain']['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
