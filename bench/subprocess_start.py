"""What a training in its own process costs: seconds from Start to the first training step.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/subprocess_start.py             # 3 repeats of each
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/subprocess_start.py --repeats 5

in-process: `trainer.train(config)` called in this process, the engine already imported (as in an
app that has trained once before); the time runs from the call to the first StepEvent.
subprocess: the app's default, `JobManager.start(config)`, which checks the inputs, copies nothing
(a folder of images), and starts `python -m trainer train --events json` in a child; the time runs
from the call to the first StepEvent read back from the child's stdout. The difference is the
child's interpreter and imports (torch, diffusers, transformers, accelerate) and reading the model
again. The two are interleaved (in, sub, in, sub, ...) so that a busy machine weighs on both alike.
Tiny model (tests/tiny_model.py), 3 steps, 32 px, LoRA, CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def subject_images(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i, (dx, dy) in enumerate(((0, 0), (5, -3), (-4, 4), (3, 6))):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle((18 + dx, 18 + dy, 45 + dx, 45 + dy), fill=(220, 20, 20))
        image.save(folder / f"subject_{i}.png")
    return folder


def in_process(config) -> float:
    from trainer import train
    from trainer.events import StepEvent

    first: list[float] = []
    began = time.monotonic()
    train(config, on_event=lambda e: first.append(time.monotonic()) if isinstance(e, StepEvent) else None)
    return first[0] - began


def subprocess_start(config, jobs_dir: Path) -> float:
    from space.jobs import JobManager
    from trainer.events import StepEvent

    jobs = JobManager(jobs_dir=jobs_dir, gpu_count=0)
    stepped = threading.Event()
    first: list[float] = []
    apply = jobs._apply

    def record(job, event) -> None:
        if isinstance(event, StepEvent) and not first:
            first.append(time.monotonic())
            stepped.set()
        apply(job, event)

    jobs._apply = record
    began = time.monotonic()
    jobs.start(config)
    stepped.wait(300)
    jobs.wait(300)
    return first[0] - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tiny_model import build_tiny_pipeline
    from train_helpers import tiny_config

    import trainer.loop  # noqa: F401  (imported before timing: the in-process case is a warm app)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_pipeline(tmp / "model")
        images = subject_images(tmp / "subject")
        times: dict[str, list[float]] = {"in-process": [], "subprocess": []}
        for i in range(args.repeats):
            for kind in times:
                config = tiny_config(model, images, tmp / "runs" / f"{kind}-{i}", max_train_steps=3)
                seconds = in_process(config) if kind == "in-process" else subprocess_start(config, tmp / "jobs")
                times[kind].append(seconds)
                print(f"{kind:>11} #{i + 1}: {seconds:6.2f} s to the first step", flush=True)
        print()
        for kind, values in times.items():
            print(f"{kind:>11}: median {statistics.median(values):6.2f} s  (min {min(values):.2f}, "
                  f"max {max(values):.2f}, n={len(values)})")
        overhead = statistics.median(times["subprocess"]) - statistics.median(times["in-process"])
        print(f"subprocess overhead: {overhead:+.2f} s (median)")


if __name__ == "__main__":
    main()
