"""Seconds per training step and peak memory: {torch AdamW, 8-bit AdamW} x {checkpointing off, on}.

    python bench/train_step.py                 # tiny model and the full SD 1.5 UNet (random weights)
    python bench/train_step.py --model tiny    # seconds, not minutes
    python bench/train_step.py --steps 3
    python bench/train_step.py --model tiny-sdxl --steps 1   # a tiny UNet through all 16 SDXL cells (smoke test)
    python bench/train_step.py --model sdxl    # the SDXL UNet (2.6 B parameters): 512 and 1024 px, LoRA and full
    python bench/train_step.py --model sdxl --resolution 512 --method lora --optimizer adamw8bit \\
        --checkpointing on --steps 1           # one cell alone
    python bench/train_step.py --model sdxl --precision bf16   # frozen weights bf16, step under autocast

Selection: --model {tiny,sd15,tiny-sdxl,sdxl,all} (all = tiny + sd15; SDXL only on request);
--resolution, --method, --optimizer, --checkpointing take one or more values (repeated, space- or
comma-separated) and default to all of theirs, except --method, which defaults to full for tiny and
sd15 and to both for SDXL. --resolution applies to SDXL only: 1024 px is 128x128 latents, 512 px
64x64 (tiny-sdxl: 16x16 and 8x8); sd15 stays at 64x64 latents (512 px), tiny at its 16x16.

Each cell runs in its own process, so peak RSS (and peak CUDA memory on a GPU) is that cell's.
The step is the engine's own: a UNet forward and backward at batch 1 (SDXL: with its added
text_embeds [1, 1280] and time_ids [1, 6] and 2048-wide [1, 77] text states), gradient clipping,
the engine's optimizer over the trainable parameters, zero_grad(set_to_none=True). LoRA freezes
the UNet and adds rank-r adapters to to_q/to_k/to_v/to_out.0, as the engine does. The text
encoders and VAE are left out: with cached latents and embeddings a step never runs them.
--precision fp16/bf16 keeps frozen weights in that dtype and trainable ones in fp32 and runs the
step under torch.autocast (fp16 with a GradScaler), as the engine's mixed precision does; fp16
needs CUDA. Only the steps are timed, not the build; the first step (warm-up) is not timed.

Before building, a cell estimates its memory (weights 4 B/param, as built in fp32; trainable
parameters also 4 B of gradient and 8 B of AdamW state, ~2 B for 8-bit AdamW; activations not
counted, so it is a floor) and, above 90% of this machine's RAM (CUDA: free GPU memory), prints a
"does not fit" row instead of running. A cell that fails anyway (out of memory, killed) is a row
with the reason.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
# The UNet of SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), built with
# random weights: 2,567 M parameters. attention_head_dim is, as in the release, the number of heads
# (64 channels each); the added "text_time" embedding takes the pooled text embedding (1280) and six
# time ids of 256 sinusoids each: 1280 + 6 * 256 = 2816.
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
}
SDXL_MODELS = ("tiny-sdxl", "sdxl")
# Latent side per resolution (px) for the SDXL models; tiny-sdxl is an 1/8-scale stand-in of each cell.
SDXL_LATENTS = {"sdxl": {512: 64, 1024: 128}, "tiny-sdxl": {512: 8, 1024: 16}}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # trainer.families' unet_lora_targets
OPTIMIZERS, CHECKPOINTING, METHODS, RESOLUTIONS = ("adamw", "adamw8bit"), ("off", "on"), ("full", "lora"), (512, 1024)
FIT_FRACTION = 0.9


def unet_config(model: str) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import SDXL_UNET_CONFIG, UNET_CONFIG  # the tests' tiny models

    return {"tiny": UNET_CONFIG, "sd15": SD15_UNET, "tiny-sdxl": SDXL_UNET_CONFIG, "sdxl": SDXL_UNET}[model]


def lora_param_count(unet, rank: int) -> int:
    """Parameters the LoRA adapters add: r * (in + out) per targeted Linear."""
    import torch

    return sum(rank * (m.in_features + m.out_features) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS))


def estimate_bytes(total: int, trainable: int, optimizer: str) -> int:
    """A floor of the cell's memory: weights (built in fp32) + trainable params' gradients and optimizer state."""
    state = 2 if optimizer == "adamw8bit" else 8
    return 4 * total + trainable * (4 + state)


def available_bytes(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, "this GPU has {:.1f} GiB free"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024, "this machine has {:.1f} GiB"
    raise RuntimeError("no MemTotal in /proc/meminfo")


@dataclass
class StepSetup:
    """What a cell's timed step needs: the model, its trainable parameters, the optimizer and the AMP settings."""

    unet: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    dtype: torch.dtype
    device: torch.device
    notes: list[str]


def size_up(cell: dict, config_dict: dict, row: dict, device: torch.device) -> bool:
    """Count the parameters on the meta device (no memory, no init) into `row`; False (and why) if it cannot fit."""
    import torch
    from diffusers import UNet2DConditionModel

    method = cell["method"]
    with torch.device("meta"):
        shape = UNet2DConditionModel(**config_dict)
    total = sum(p.numel() for p in shape.parameters())
    lora = lora_param_count(shape, cell["rank"]) if method == "lora" else 0
    del shape
    row["params_m"] = (total + lora) / 1e6
    row["trainable_m"] = (lora if method == "lora" else total) / 1e6
    needed = estimate_bytes(total + lora, lora if method == "lora" else total, cell["optimizer"])
    have, have_text = available_bytes(device)
    row["estimate_gib"] = needed / 2**30
    if needed > FIT_FRACTION * have:
        row["skipped"] = f"does not fit: needs ≥ {needed / 2**30:.1f} GiB, {have_text.format(have / 2**30)}"
        return False
    return True


def build_unet(cell: dict, config_dict: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet as the engine trains it: random weights, LoRA or full, frozen weights in `dtype`, SDPA."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    method = cell["method"]
    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the GPU is seconds, not minutes
        unet = UNet2DConditionModel(**config_dict)
    unet.requires_grad_(method == "full")
    if method == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=cell["rank"], lora_alpha=cell["rank"], init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    unet.to(device)
    if dtype != torch.float32:  # as trainer.models.prepare_for_training: frozen in half, trainable in fp32
        unet.to(dtype=dtype)
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    unet.set_attn_processor(AttnProcessor2_0())
    unet.train()
    if cell["checkpointing"]:
        unet.enable_gradient_checkpointing()
    return unet


def build_step(cell: dict, config_dict: dict, device: torch.device) -> StepSetup:
    """The UNet, the engine's optimizer over its trainable parameters and, for fp16, a GradScaler."""
    import torch

    from trainer.config import TrainConfig
    from trainer.optim import make_optimizer

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cell["precision"]]
    unet = build_unet(cell, config_dict, device, dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    config = TrainConfig(method=cell["method"], use_8bit_adam=cell["optimizer"] == "adamw8bit")
    notes: list[str] = []
    opt = make_optimizer(params, [], config, notes.append)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return StepSetup(unet, params, opt, scaler, dtype, device, notes)


def step_inputs(unet: torch.nn.Module, size: int, device: torch.device) -> dict:
    """Random latents and text states at batch 1; for SDXL also the pooled text embedding and the time ids."""
    import torch

    latents = torch.randn(1, 4, size, size, device=device)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, device=device)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        px = float(size * 8)  # original size, crop top-left, target size: the engine's time ids
        added = {"text_embeds": torch.randn(1, pooled, device=device),
                 "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]], device=device)}
    return {"latents": latents, "hidden": hidden, "added": added}


def train_step(setup: StepSetup, inputs: dict, first: bool) -> None:
    """One engine step: forward under autocast, MSE, backward, clip at 1.0, optimizer step, zero_grad."""
    import torch

    device, scaler, opt, params = setup.device, setup.scaler, setup.opt, setup.params
    latents = inputs["latents"]
    t = torch.randint(0, 1000, (1,), device=device)
    with torch.autocast(device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32):
        pred = setup.unet(latents, t, inputs["hidden"], added_cond_kwargs=inputs["added"]).sample
    loss = torch.nn.functional.mse_loss(pred.float(), latents)
    (scaler.scale(loss) if scaler else loss).backward()
    if first:
        missing = sum(p.grad is None for p in params)
        if missing:
            setup.notes.append(f"{missing} of {len(params)} trainable tensors got no gradient")
    if scaler:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(setup: StepSetup, inputs: dict, steps: int) -> tuple[list[float], str | None]:
    """Seconds of each of steps + 1 steps (the first is warm-up); on out-of-memory, those done and why it stopped."""
    import torch

    device = setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the steps' peak, not the fp32 build's
    times: list[float] = []
    try:
        for i in range(steps + 1):  # the first step (allocations, kernel choice) is not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(setup, inputs, first=i == 0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as err:
        return times, f"out of memory after {len(times)} step(s): {str(err).splitlines()[0][:120]}"
    return times, None


def run_cell(cell: dict, steps: int) -> dict:
    import torch

    from trainer.optim import optimizer_state_bytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = {**cell, "device": str(device)}
    config_dict = unet_config(cell["model"])
    if not size_up(cell, config_dict, row, device):
        return row

    setup = build_step(cell, config_dict, device)
    inputs = step_inputs(setup.unet, cell["latents"], device)
    times, failed = time_steps(setup, inputs, steps)
    if failed:
        row["failed"] = failed
    else:
        row["sec_per_step"] = sum(times[1:]) / steps
    row.update({
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "optimizer_state_mib": optimizer_state_bytes(setup.opt) / 2**20,
        "optimizer_class": type(setup.opt).__name__, "notes": setup.notes,
    })
    return row


def failure_reason(out: subprocess.CompletedProcess) -> str:
    if out.returncode < 0:
        sig = signal.Signals(-out.returncode).name
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if sig == "SIGKILL" else ""
        return f"killed by {sig}{hint}"
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "no message"
    return f"failed (exit {out.returncode}): {last[:160]}"


def split_values(values: list[str] | None, choices: tuple, parser: argparse.ArgumentParser, flag: str) -> list:
    """`--x a --x b`, `--x a b` and `--x a,b` all select a and b; None selects every choice."""
    if not values:
        return list(choices)
    out = []
    for item in (v for value in values for v in value.split(",") if v.strip()):
        item = item.strip()
        value = int(item) if isinstance(choices[0], int) and item.isdigit() else item
        if value not in choices:
            parser.error(f"{flag}: {item!r} is not one of {', '.join(map(str, choices))}")
        if value not in out:
            out.append(value)
    return out


def label(r: dict) -> str:
    text = r["model"]
    if r["model"] in SDXL_MODELS:
        text += f" {r['resolution']}px"
    if r["model"] in SDXL_MODELS or r["method"] != "full":
        text += f" {r['method']}"
    return text



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd15", "tiny-sdxl", "sdxl", "all"], default="all",
                        help="all = tiny + sd15; the SDXL models run only when named")
    parser.add_argument("--resolution", action="append", nargs="+", metavar="PX",
                        help="SDXL only: 512 and/or 1024 (default both)")
    parser.add_argument("--method", action="append", nargs="+",
                        help="full and/or lora (default: both for SDXL, full otherwise)")
    parser.add_argument("--optimizer", action="append", nargs="+", help="adamw and/or adamw8bit (default both)")
    parser.add_argument("--checkpointing", action="append", nargs="+", help="off and/or on (default both)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="fp16/bf16: frozen weights in that dtype, step under autocast (fp16 needs CUDA)")
    parser.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per cell, after one warm-up step")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON), print JSON
    return parser


def flatten(groups: list[list[str]] | None) -> list[str] | None:
    """`action="append", nargs="+"` gives a list of lists; None when the flag was not given."""
    return [v for group in groups for v in group] if groups else None


def plan_cells(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    """One cell per selected model x resolution (SDXL) x method x optimizer x checkpointing."""
    resolutions = split_values(flatten(args.resolution), RESOLUTIONS, parser, "--resolution")
    methods_given = flatten(args.method)
    methods = split_values(methods_given, METHODS, parser, "--method")
    optimizers = split_values(flatten(args.optimizer), OPTIMIZERS, parser, "--optimizer")
    checkpointing = split_values(flatten(args.checkpointing), CHECKPOINTING, parser, "--checkpointing")

    models = ["tiny", "sd15"] if args.model == "all" else [args.model]
    if args.resolution and not any(m in SDXL_MODELS for m in models):
        print("note: --resolution applies to the SDXL models only; tiny and sd15 run at their own latent size",
              file=sys.stderr)
    cells = []
    for model in models:
        sdxl = model in SDXL_MODELS
        for res in resolutions if sdxl else [512 if model == "sd15" else None]:
            latents = SDXL_LATENTS[model][res] if sdxl else unet_config(model)["sample_size"]
            for method in methods if (sdxl or methods_given) else ["full"]:
                for optimizer in optimizers:
                    for ckpt in checkpointing:
                        cells.append({"model": model, "resolution": res, "latents": latents, "method": method,
                                      "optimizer": optimizer, "checkpointing": ckpt == "on",
                                      "precision": args.precision, "rank": args.lora_rank})
    return cells


def run_cell_process(cell: dict, steps: int, device: str) -> dict:
    """Run one cell in its own process (so peak memory is that cell's); its row, or one saying why it failed."""
    out = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell), "--steps", str(steps)],
                         capture_output=True, text=True)
    try:
        row = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        row = {**cell, "device": device, "failed": failure_reason(out)}
    if out.returncode != 0 and "failed" not in row:
        row["failed"] = failure_reason(out)
    what = (f"{row['sec_per_step']:.2f} s/step" if "sec_per_step" in row
            else row.get("skipped") or row.get("failed"))
    print(f"  done {label(row)} {cell['optimizer']} ckpt={'on' if cell['checkpointing'] else 'off'}: {what}",
          file=sys.stderr)
    return row


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """The settings line, one table row per cell, then each cell's notes."""
    print(f"device: {rows[0]['device']}; batch 1; {args.precision}; {args.steps} timed steps per cell after one "
          f"warm-up" + (f"; LoRA rank {args.lora_rank}" if "lora" in {r["method"] for r in rows} else ""))
    print("| model | params | method | trainable | latents | optimizer | grad ckpt | s/step | it/s | peak RSS GiB "
          "| peak CUDA GiB | optimizer state MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        params = f"{r['params_m']:.1f} M" if "params_m" in r else "-"
        trainable = f"{r['trainable_m']:.2f} M" if "trainable_m" in r else "-"
        opt = r.get("optimizer_class") or {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}[r["optimizer"]]
        head = (f"| {r['model']} | {params} | {r['method']} | {trainable} | {r['latents']}x{r['latents']} | {opt} "
                f"| {'on' if r['checkpointing'] else 'off'} ")
        if "sec_per_step" in r:
            cuda = f"{r['peak_cuda_gib']:.2f}" if r["peak_cuda_gib"] is not None else "-"
            print(head + f"| {r['sec_per_step']:.3f} | {1 / r['sec_per_step']:.2f} | {r['peak_rss_gib']:.2f} | {cuda} "
                         f"| {r['optimizer_state_mib']:.1f} |")
        else:
            print(head + f"| {r.get('skipped') or r.get('failed')} | - | - | - | - |")
    for r in rows:
        for note in r.get("notes", ()):
            print(f"note ({label(r)} {r['optimizer']}): {note}")


def print_ratios(rows: list[dict]) -> None:
    """Each cell against its group's (model, resolution, method) torch AdamW, checkpointing off."""
    done = [r for r in rows if "sec_per_step" in r]
    groups = list(dict.fromkeys((r["model"], r["resolution"], r["method"]) for r in rows))
    for key in groups:
        group = [r for r in done if (r["model"], r["resolution"], r["method"]) == key]
        base = next((r for r in group if r["optimizer"] == "adamw" and not r["checkpointing"]), None)
        if base is None:
            continue
        for r in group:
            if r is not base:
                print(f"{label(r)}: {r['optimizer']} ckpt={'on' if r['checkpointing'] else 'off'} vs adamw ckpt=off: "
                      f"time x{r['sec_per_step'] / base['sec_per_step']:.2f}, "
                      f"RSS x{r['peak_rss_gib'] / base['peak_rss_gib']:.2f}, "
                      f"optimizer state x{r['optimizer_state_mib'] / max(base['optimizer_state_mib'], 1e-9):.2f}")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell), args.steps)))
        return
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.lora_rank < 1:
        parser.error("--lora-rank must be at least 1")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "fp16" and device == "cpu":
        parser.error("--precision fp16 needs a CUDA GPU (fp16 autocast and GradScaler are CUDA's); "
                     "on a CPU use bf16 or fp32")
    cells = plan_cells(args, parser)
    rows = [run_cell_process(cell, args.steps, device) for cell in cells]
    print_table(rows, args)
    print_ratios(rows)


if __name__ == "__main__":
    main()
