"""Where the mid model's training step goes, and what the candidate speed-ups do to it.

    OMP_NUM_THREADS=1 python bench/step_candidates.py            # every candidate; profile of eager
    OMP_NUM_THREADS=1 python bench/step_candidates.py --candidates checkpointed engine --latents 32
    OMP_NUM_THREADS=1 python bench/step_candidates.py --candidates eager --profile 25
    OMP_NUM_THREADS=1 python bench/step_candidates.py --model tiny --lora --steps 40 --repeats 5 \
        --candidates checkpointed reentrant engine --profile 0   # the toy model's LoRA step

The step is the engine's shape of step on the side-by-side benchmark's mid UNet (bench/vs_reference.py:
~18 M parameters, 64x64 latents; --model tiny: the tests' tiny UNet, 16x16 latents unless --latents
says otherwise), batch 2 = instance + class row, fp32, plain AdamW so that the optimizer does not hide
the UNet: forward, MSE, backward, optimizer step. --lora freezes the UNet and trains rank-4 adapters
on to_q/to_k/to_v/to_out.0, as the engine does. Candidates:
  eager          SDPA (AttnProcessor2_0), no checkpointing
  padded         heads under 16 channels zero-padded to 16 for SDPA's flash kernel (trainer/speed.py)
  kernel         the engine's CPU attention for heads under 16 channels: its own kernel
                 (trainer/kernels/small_heads.c)
  checkpointed   eager with diffusers' gradient checkpointing (what the reference runs)
  selective      checkpointed, keeping attention outputs instead of recomputing them (trainer/speed.py)
  reentrant      checkpointed in torch's re-entrant form (trainer/speed.py)
  engine         what the engine chooses on this CPU for these latents (trainer.speed.choose): at
                 4,096 tokens kernel + selective, at 256 kernel + re-entrant; GEGLU on its kernel
  engine-padded  the same with padded heads instead of the kernel (the engine before the kernel,
                 and where it cannot be built)
  channels-last  eager with channels-last memory format
  compiled       eager under torch.compile
With --repeats N the candidates' timed runs are interleaved N times (A B C A B C ...) and the median
s/step is printed. The script re-executes itself onto jemalloc as the trainer does (where it is
installed; DREAMBOOTH_ALLOCATOR=system keeps glibc's malloc) and prints the allocator in use.
Each candidate runs in
this process after one warm-up step (compilation included there, and reported apart), and its loss
and weights after the timed steps are compared with eager's, so a speed-up that changes the result
shows. The one-thread 2048² fp32 matmul peak is measured in the same minute, and each candidate's
achieved GFLOP/s (torch's FlopCounterMode, given torch's SDPA formulas for the CPU attention kernel
as bench/vs_reference.py does) is printed as a fraction of it, with and without the attention's matmuls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    # On the trainer's allocator (`python -m trainer train` re-executes itself onto jemalloc where it
    # is installed): under glibc the step's large fresh tensors page-fault, and element-wise operations
    # and concatenations profile 5-10x slower than in a training run.
    from trainer.allocator import reexecute_with_jemalloc

    reexecute_with_jemalloc()

import torch  # noqa: E402
from vs_reference import MID_UNET  # noqa: E402


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


CANDIDATES = ["eager", "padded", "kernel", "checkpointed", "selective", "reentrant", "engine", "engine-padded",
              "channels-last", "compiled"]
LATENTS = 64  # --latents: the side of the latent grid (64: SD 1.5's grid at 512 px)
UNET = MID_UNET  # --model
LORA = False  # --lora


def make_unet(name: str = "eager") -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from trainer.speed import SpeedChoices, attention_processor, choose, enable_checkpointing

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    if LORA:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    choices = {
        "checkpointed": SpeedChoices(pad_heads=False, selective_checkpointing=False),
        "selective": SpeedChoices(pad_heads=False, selective_checkpointing=True),
        "reentrant": SpeedChoices(pad_heads=False, selective_checkpointing=False, reentrant_checkpointing=True),
    }.get(name)
    if name in ("engine", "engine-padded"):
        choices = choose(unet, torch.device("cpu"), LATENTS, gradient_checkpointing=True)[0]
    small = name in ("padded", "kernel") or bool(choices and choices.pad_heads)
    unet.set_attn_processor(attention_processor(pad_heads=small, kernel=name not in ("padded", "engine-padded")))
    if choices is not None and choices.fused_geglu:
        from trainer.geglu import fuse

        fuse(unet)
    if choices is not None:
        enable_checkpointing(unet, choices)
    unet.train()
    if name == "channels-last":
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def inputs(channels_last: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    channels = UNET.get("in_channels", 4)
    latents = torch.randn(2, channels, LATENTS, LATENTS, generator=gen)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    hidden = torch.randn(2, 77, UNET["cross_attention_dim"], generator=gen)
    return latents, hidden, torch.tensor([500, 20]), torch.randn(2, channels, LATENTS, LATENTS, generator=gen)


def step_fn(unet: torch.nn.Module, forward, opt: torch.optim.Optimizer):
    def step(latents, hidden, timesteps, target) -> float:
        loss = torch.nn.functional.mse_loss(forward(latents, timesteps, hidden), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def prepare(name: str) -> dict:
    """A candidate's UNet, optimizer and inputs, after its first (warm-up) step."""
    channels_last = name == "channels-last"
    unet = make_unet(name)
    forward = lambda x, t, h: unet(x, t, h).sample  # noqa: E731
    if name == "compiled":
        forward = torch.compile(forward)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    step = step_fn(unet, forward, opt)
    args = inputs(channels_last)
    start = time.perf_counter()
    step(*args)
    return {"name": name, "unet": unet, "step": step, "args": args, "first": time.perf_counter() - start,
            "times": [], "losses": []}


def timed(candidate: dict, steps: int) -> None:
    """`steps` more steps of a candidate: their mean time and losses are added to it."""
    start = time.perf_counter()
    candidate["losses"] += [candidate["step"](*candidate["args"]) for _ in range(steps)]
    candidate["times"].append((time.perf_counter() - start) / steps)


def step_flops() -> tuple[float, float]:
    """The eager step's FLOPs: all of them, and the attention kernels' share (see vs_reference's)."""
    from torch.utils.flop_counter import FlopCounterMode
    from vs_reference import attention_flops, count_cpu_attention

    count_cpu_attention()
    unet = make_unet()
    latents, hidden, timesteps, target = inputs(False)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.mse_loss(unet(latents, timesteps, hidden).sample, target).backward()
    return counter.get_total_flops(), attention_flops(counter)


def profile(steps: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    unet = make_unet()
    params = [p for p in unet.parameters() if p.requires_grad]
    step = step_fn(unet, lambda x, t, h: unet(x, t, h).sample, torch.optim.AdamW(params, lr=1e-4))
    args = inputs(False)
    step(*args)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(*args)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES, choices=CANDIDATES)
    parser.add_argument("--latents", type=int, help="latent grid side (default 64; tiny: 16)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per candidate and repeat (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of timed steps (default 1)")
    parser.add_argument("--model", choices=("mid", "tiny"), default="mid")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters, the UNet frozen")
    parser.add_argument("--profile", type=int, default=15, help="rows of the eager step's op profile (0: none)")
    args = parser.parse_args()
    global LATENTS, UNET, LORA
    if args.model == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_model import UNET_CONFIG

        UNET = UNET_CONFIG
    LATENTS = args.latents or (16 if args.model == "tiny" else 64)
    LORA = args.lora

    peak = matmul_gflops()
    flops, attention = step_flops()
    from trainer.allocator import in_use

    print(f"threads {torch.get_num_threads()}; allocator {in_use()}; matmul peak {peak:.1f} GFLOP/s; "
          f"step {flops / 1e9:.1f} GFLOP ({attention / 1e9:.1f} of them attention's matmuls; the GFLOP/s and "
          f"fraction of peak below count all, the last column convolutions and linears only)")
    rows = [prepare(name) for name in args.candidates]
    for _ in range(args.repeats):  # interleaved: A B C A B C ...
        for row in rows:
            timed(row, args.steps)
    for row in rows:
        row["per_step"] = statistics.median(row["times"])
        row["weights"] = {k: v.detach().contiguous() for k, v in row.pop("unet").state_dict().items()}
    base = rows[0]
    print("| candidate | first step s | s/step | GFLOP/s | of peak | max |Δloss| vs first | max |Δweight| "
          "| of peak without attention |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dloss = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True))
        dweight = max((r["weights"][k] - base["weights"][k]).abs().max().item() for k in base["weights"])
        print(f"| {r['name']} | {r['first']:.2f} | {r['per_step']:.3f} | {flops / r['per_step'] / 1e9:.1f} | "
              f"{flops / r['per_step'] / 1e9 / peak:.0%} | {dloss:.2e} | {dweight:.2e} | "
              f"{(flops - attention) / r['per_step'] / 1e9 / peak:.0%} |")
    if args.profile:
        profile(min(args.steps, 2), args.profile)


if __name__ == "__main__":
    main()
