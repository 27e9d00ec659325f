"""Trainings started the way a user starts them on several processes: `accelerate launch … -m trainer train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from train_helpers import safetensors_dir

REPO = Path(__file__).resolve().parents[1]


def launch(processes: int, config: Path, out: Path, *flags: str, accelerate: tuple[str, ...] = (),
           events: str = "json", expect: int = 0) -> subprocess.CompletedProcess:
    """Train from `config` into `out` on `processes` processes (plain `python` for one, unless
    `accelerate` arguments are given); the finished process, its exit status checked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    train = ["-m", "trainer", "train", "--config", str(config), "--output-dir", str(out), "--events", events, *flags]
    if processes == 1 and not accelerate:
        command = [sys.executable, *train]
    else:
        if not accelerate:  # how the README tells a CPU-only machine to run several DDP processes
            env["ACCELERATE_USE_CPU"] = "true"
            accelerate = ("--multi_gpu",)
        command = [sys.executable, "-m", "accelerate.commands.launch", *accelerate, "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *train]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def json_events(done: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weight_differences(a: Path, b: Path, part: str = "unet") -> torch.Tensor:
    left, right = safetensors_dir(a / part), safetensors_dir(b / part)
    assert left.keys() == right.keys()
    return torch.cat([(left[k].float() - right[k].float()).abs().flatten() for k in left])


def assert_same_weights(a: Path, b: Path, lr: float, parts: tuple[str, ...] = ("unet", "text_encoder")) -> None:
    """The same weights, stated in Adam steps (each moves a weight by about the learning rate): at
    least 99.9% within 1% of one step and none further than half a step. Float sums in another order
    are all that may differ; Adam's division magnifies their rounding where a gradient is about zero."""
    for part in parts:
        diff = weight_differences(a, b, part)
        beyond = (diff > 0.01 * lr).float().mean().item()
        assert beyond < 1e-3 and diff.max() < 0.5 * lr, (part, beyond, diff.max().item())


def square_photos(folder: Path) -> Path:
    """Four photos of a red square, each shifted a little."""
    from PIL import Image, ImageDraw

    folder.mkdir()
    for i, (dx, dy) in enumerate([(0, 0), (-6, 4), (5, -5), (3, 6)]):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle((18 + dx, 18 + dy, 45 + dx, 45 + dy), fill=(220, 20, 20))
        image.save(folder / f"subject-{i}.png")
    return folder
