"""The GPU check, as one script: real trainings of the SD 1.5 architecture, peak memory beside
the memory model's prediction, it/s.

    python bench/gpu_check.py --json $OUT/gpu_check.json          # on a GPU: SD 1.5, 512 px, fp16 (~5 min on an H200)
    python bench/gpu_check.py --model tiny --steps 4 --class-steps 2  # smoke test anywhere (CPU: fp32)

What it runs: the SD 1.5 architecture with random weights (trainer/memory/shapes.py's KNOWN_CONFIGS["sd"]:
UNet 860 M, CLIP ViT-L/14 text encoder, VAE; SD 1.5's PNDM scheduler; the repository's CLIP tokenizer),
built once and saved as safetensors into the work folder, so nothing is downloaded. Then, for full
DreamBooth and for LoRA (rank 4), one `trainer.train` in its own process (one accelerate state each):
512 px, mixed precision fp16 (on CUDA; fp32 on a CPU), 8-bit AdamW, gradient checkpointing, batch 1 with
prior preservation (weight 1), --class-images class images generated first (--class-steps denoising
steps, 4 at a time), the text encoder frozen, --steps optimizer steps, no checkpoint within the run.

What it measures, per run: for each phase the engine announces (class images, caching, training,
saving) the peak of `torch.cuda.max_memory_allocated` (the tensors) and of `max_memory_reserved` (what
PyTorch's caching allocator held), and, from a thread polling `torch.cuda.mem_get_info` every 10 ms,
the peak memory in use on the device (the process's CUDA context included: what nvidia-smi shows; the
GPU should be otherwise idle; on a CPU the process's peak RSS instead); it/s from the run's metrics.jsonl (median step after the first). Beside
them, `trainer.memory.estimate.estimate` of the same config: its tensor bytes for each phase and its predicted
peak (the largest phase + the CUDA context + allocator slack), made in the training's process before
anything loads, from the model folder's config files alone (the parent process never touches the GPU).

Targets: full DreamBooth peak <= 10 GB (the best published figure, 9.92 GB on a T4), LoRA
<= 6 GB, and the memory model within 10% of the measured peak.

On a GPU machine whose Python 3.12 has torch, transformers, accelerate and peft but neither diffusers
nor bitsandbytes, carry those two as wheels (49.5 MB together, under the 64 MiB a call may carry). Here, once, in the repository's root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl diffusers==0.42.1 bitsandbytes==0.50.2

then one device `run` with carry [".whl"] and a timeout of 600 s:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \
        python3 bench/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Building the model takes ~30 s on a 2-core CPU (4.0 GB of safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vs_reference import write_images  # noqa: E402  (bench/ is this script's own folder on sys.path)

GIB = 2**30
# SD 1.5's scheduler (scheduler/scheduler_config.json of the release)
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "skip_prk_steps": True, "steps_offset": 1,
                  "set_alpha_to_one": False}


def build_model(name: str, out: Path) -> Path:
    """The base model folder (built once per work folder)."""
    if (out / "model_index.json").is_file():
        return out
    if name == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_model import build_tiny_pipeline

        return build_tiny_pipeline(out)
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.memory.shapes import KNOWN_CONFIGS
    from trainer.toyworld import CLIP_TOKENIZER_DIR

    configs = KNOWN_CONFIGS["sd"]
    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR),
        unet=UNet2DConditionModel.from_config(configs["unet"]),
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


def make_config(args: argparse.Namespace, method: str, work: Path, precision: str):
    from trainer.config import TrainConfig

    return TrainConfig(
        pretrained_model=str(work / "model"), instance_data=(str(work / "images"),), identifier="sks",
        instance_prompt="a photo of sks dog", output_dir=str(work / f"run-{method}"), resolution=args.resolution,
        method=method, lora_rank=4, mixed_precision=precision, use_8bit_adam=True, gradient_checkpointing=True,
        train_batch_size=1, gradient_accumulation_steps=1, with_prior_preservation=True,
        class_prompt="a photo of a dog", prior_loss_weight=1.0, num_class_images=args.class_images,
        class_cache_dir=str(work / f"class-cache-{method}"), sample_batch_size=4, class_inference_steps=args.class_steps,
        max_train_steps=args.steps, learning_rate=5e-6 if method == "full" else 1e-4,
        checkpointing_steps=10**9, report_to="none", seed=0,
    )


class DevicePeak:
    """The peak memory in use on the GPU (total - free), polled from a thread."""

    def __init__(self, interval: float = 0.01) -> None:
        import torch

        self.torch, self.interval, self.peak = torch, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            free, total = self.torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.interval)

    def __enter__(self) -> DevicePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> None:
    """One training, in this process; prints one JSON line."""
    import torch

    from trainer import train
    from trainer.events import PhaseEvent
    from trainer.memory.estimate import estimate

    work, method = Path(args.work_dir), args.child
    config = make_config(args, method, work, args.precision)
    cuda = torch.cuda.is_available()
    # made here, before anything loads: the parent never touches the GPU (a CUDA context there would
    # count in the device's memory in use)
    predicted = estimate(config, "cuda" if cuda else "cpu", local_only=True)
    phases: dict[str, dict[str, float]] = {}
    current = ["loading"]

    def close_phase() -> None:
        if cuda:
            row = phases.setdefault(current[0], {"allocated": 0.0, "reserved": 0.0})
            row["allocated"] = max(row["allocated"], torch.cuda.max_memory_allocated() / GIB)
            row["reserved"] = max(row["reserved"], torch.cuda.max_memory_reserved() / GIB)
            torch.cuda.reset_peak_memory_stats()

    def on_event(event) -> None:
        if isinstance(event, PhaseEvent) and event.phase != current[0]:
            close_phase()
            current[0] = event.phase

    started = time.monotonic()
    if cuda:
        torch.cuda.init()
        with DevicePeak() as device:
            result = train(config, on_event=on_event)
            close_phase()
        device_peak = device.peak / GIB
    else:  # the CPU's "device memory" is the process's: its peak resident set
        import resource

        result = train(config, on_event=on_event)
        device_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    seconds = [m["seconds"] for m in metrics[1:]] or [m["seconds"] for m in metrics]
    print(json.dumps({
        "method": method, "status": result.status, "steps": result.step, "phases": phases,
        "device_peak_gib": device_peak, "it_per_s": 1 / statistics.median(seconds),
        "wall_s": time.monotonic() - started,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "predicted": {"peak_gib": predicted.peak_accelerator / GIB, "peak_phase": predicted.peak_phase,
                      "phases_gib": {k: v / GIB for k, v in predicted.phases.items()},
                      "overhead_gib": predicted.overhead / GIB},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--methods", default="full,lora", help="full and/or lora (default both)")
    parser.add_argument("--resolution", type=int, help="default 512 (tiny: 32)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training (default 30)")
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--class-steps", type=int, default=25, help="denoising steps of a class image")
    parser.add_argument("--work-dir", type=Path, help="model, images, runs (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolution = args.resolution or (32 if args.model == "tiny" else 512)
    if args.child:
        child(args)
        return

    import torch

    cuda = torch.cuda.is_available()  # asks NVML: no CUDA context in this process
    precision = "fp16" if cuda else "no"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}; {'CUDA' if cuda else 'no GPU: a smoke test in fp32 on the CPU'}", flush=True)
    began = time.monotonic()
    build_model(args.model, work / "model")
    write_images(work / "images", 4, max(args.resolution, 64), "dog", seed=0)  # the side-by-side's photos
    print(f"model and photos ready in {time.monotonic() - began:.0f} s", flush=True)

    rows = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--child", method, "--precision", precision, "--model", args.model,
                   "--resolution", str(args.resolution), "--steps", str(args.steps),
                   "--class-images", str(args.class_images), "--class-steps", str(args.class_steps),
                   "--work-dir", str(work)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        if out.returncode != 0:
            print(f"{method}: failed (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
            rows.append({"method": method, "failed": out.stderr[-1000:]})
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{method}: {row['status']} {row['steps']} steps, {row['it_per_s']:.2f} it/s, "
              f"wall {row['wall_s']:.0f} s", flush=True)

    print(f"\n{args.model} at {args.resolution} px, {precision if cuda else 'fp32'}, 8-bit AdamW, gradient "
          f"checkpointing, batch 1 + 1 class image, {args.steps} steps; {rows[0].get('device', '?')}")
    print("| method | it/s | measured peak in use GiB (GB) | predicted peak GiB | predicted / measured | "
          "peak phase predicted | per phase: measured allocated / predicted tensors GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['method']} | failed | | | | | |")
            continue
        pred = row["predicted"]
        measured = row["device_peak_gib"]
        phases = "; ".join(f"{name} {vals['allocated']:.2f}" for name, vals in row["phases"].items())
        predicted_phases = "; ".join(f"{k} {v:.2f}" for k, v in pred["phases_gib"].items())
        ratio = f"{pred['peak_gib'] / measured:.3f}"
        shown = f"{measured:.2f} ({measured * GIB / 1e9:.2f})" + ("" if cuda else " RSS")
        print(f"| {row['method']} | {row['it_per_s']:.2f} | {shown} | {pred['peak_gib']:.2f} | {ratio} | "
              f"{pred['peak_phase']} | measured: {phases or '-'} / predicted: {predicted_phases} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "resolution": args.resolution, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
