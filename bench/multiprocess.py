"""Training throughput on 1 and 2 processes (DDP over gloo on the CPU), interleaved.

    python bench/multiprocess.py                      # tiny model, 3 repeats each, 8 steps
    python bench/multiprocess.py --model mid --steps 6

Each process trains with `--batch` rows per step and one thread; 2 processes run as
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`. Prints the median seconds
per optimizer step (from each run's metrics.jsonl, the first two steps left out as warm-up), images
per second (rows of the global batch per second: batch × processes / s per step) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import vs_reference  # noqa: E402  (the models and images of the side-by-side benchmark)


def command(processes: int, model_dir: Path, instance: Path, out: Path, batch: int, steps: int,
            resolution: int, method: str) -> list[str]:
    train = ["-m", "trainer", "train", "--pretrained-model", str(model_dir), "--instance-data", str(instance),
             "--identifier", "sks", "--instance-prompt", vs_reference.INSTANCE_PROMPT, "--output-dir", str(out),
             "--method", method, "--resolution", str(resolution), "--center-crop", "--no-random-flip",
             "--max-train-steps", str(steps), "--train-batch-size", str(batch), "--use-8bit-adam",
             "--gradient-checkpointing", "--mixed-precision", "no", "--checkpointing-steps", "1000000",
             "--report-to", "none", "--seed", "0", "--quiet"]
    if processes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *train]


def seconds_per_step(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in rows[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2, help="rows per process per step (default 2)")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-multiprocess-"))
    model_dir = work / f"model-{args.model}"
    info = vs_reference.child_prepare(args.model, model_dir, work / "data", instance_images=4)
    instance = work / "data" / "instance-4"
    env = {**vs_reference.run_env(1, work), "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    timings: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for processes in (1, 2):  # interleaved: 1 2 1 2 ...
            out = work / f"run-{processes}-{repeat}"
            cmd = command(processes, model_dir, instance, out, args.batch, args.steps, info["resolution"], args.method)
            done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
            timings[processes].append(seconds_per_step(out))
            print(f"repeat {repeat}, {processes} process(es): {timings[processes][-1]:.3f} s/step", flush=True)

    print(f"\n{args.model} model (UNet {info['unet_params'] / 1e6:.1f} M), {args.method}, batch {args.batch} per "
          f"process, 1 thread per process, {os.cpu_count()} CPUs, medians of {args.repeats}")
    print("| processes | s/step | images/s |")
    print("|---|---|---|")
    rate = {}
    for processes, values in timings.items():
        step = statistics.median(values)
        rate[processes] = args.batch * processes / step
        print(f"| {processes} | {step:.3f} | {rate[processes]:.2f} |")
    print(f"\n2 processes ÷ 1 process, images/s: {rate[2] / rate[1]:.2f}")


if __name__ == "__main__":
    main()
