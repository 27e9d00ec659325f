"""Peak RSS and seconds per step of our trainer on each memory allocator, interleaved.

    python bench/allocator.py                          # mid model, glibc / jemalloc / tcmalloc, 2 rounds
    python bench/allocator.py --model tiny --rounds 3
    python bench/allocator.py --allocators system,jemalloc --steps 6
    python bench/allocator.py --model tiny --method lora --steps 400 --rounds 1 \
        --allocators system,jemalloc,jemalloc-nodecay   # the growth that retired dirty_decay_ms:-1

Each run is `python -m trainer train` on bench/vs_reference.py's model and flags (full fine-tune, or LoRA with --method lora;
prior preservation with 4 ready class images, 8-bit AdamW, checkpointing, fp32, one thread), in its
own process: "system" with DREAMBOOTH_ALLOCATOR=system (glibc's malloc), "jemalloc" as the CLI
chooses by itself where libjemalloc is installed, "tcmalloc" preloaded by hand (Debian:
libtcmalloc-minimal4), "jemalloc-nodecay" jemalloc never returning freed pages
(MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1: the engine's setting for a day, see
trainer/allocator.py), "jemalloc-nodecay-fit" that with lg_extent_max_active_fit:30 (a kept extent may be
split for any smaller request), "jemalloc-thp" jemalloc's defaults with transparent huge pages
(thp:always: a tenth of the page faults on mid, but +51 MiB and no faster; not adopted). Peak RSS is ru_maxrss of the process (os.wait4); s/step is the median of
the run's own metrics.jsonl seconds after the first step. Allocators missing here are skipped.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import vs_reference  # noqa: E402  (the side-by-side benchmark's models, images and flags)

NO_DECAY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# jemalloc as the CLI runs it, with these MALLOC_CONF tunings (None: its defaults); the last is the
# candidate that kept no-decay's speed without its growth on tiny and mid (trainer/allocator.py)
JEMALLOC_TUNINGS = {"jemalloc": None, "jemalloc-nodecay": NO_DECAY,
                    "jemalloc-nodecay-fit": NO_DECAY + ",lg_extent_max_active_fit:30",
                    "jemalloc-thp": "thp:always"}


def allocator_env(name: str) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if name == "system":
        return {**env, "DREAMBOOTH_ALLOCATOR": "system"}
    if name in JEMALLOC_TUNINGS:
        if not ctypes.util.find_library("jemalloc"):
            return None
        tuning = JEMALLOC_TUNINGS[name]
        return {**env, "MALLOC_CONF": tuning} if tuning else env
    library = ctypes.util.find_library(name)
    return {**env, "LD_PRELOAD": library, "DREAMBOOTH_ALLOCATOR": "system"} if library else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=vs_reference.MODELS, default="mid")
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--allocators", default="system,jemalloc,tcmalloc",
                        help="comma-separated: system, jemalloc, jemalloc-nodecay, jemalloc-nodecay-fit, jemalloc-thp, "
                             "tcmalloc")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="allocator-bench-"))
    model_dir, data = work / "models" / args.model, work / "data" / args.model
    info = vs_reference.child_prepare(args.model, model_dir, data, 4)
    size = info["instance_px"]
    vs_reference.write_images(data / "class", 4, size, "class", seed=1)
    envs = {name: allocator_env(name) for name in args.allocators.split(",")}
    for name, env in envs.items():
        if env is None:
            print(f"{name}: not installed here, skipped")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, env in envs.items() if env}
    for _ in range(args.rounds):
        for name in results:
            out = work / "run"
            shutil.rmtree(out, ignore_errors=True)
            cmd = vs_reference.ours_command(args.method, model_dir, data / "instance-4", data / "class", work / "cache", out,
                                            args.steps, 4, info["resolution"])
            start = time.monotonic()
            child = subprocess.Popen([sys.executable, *cmd, "--quiet"], cwd=REPO, env=envs[name],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            if status != 0:
                print(f"{name}: the run failed (status {status})")
                continue
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            seconds = statistics.median([r["seconds"] for r in rows[1:] if r.get("seconds")])
            results[name].append((usage.ru_maxrss / 1024, seconds))
            print(f"  {name}: peak {usage.ru_maxrss / 1024:.0f} MiB, {seconds:.3f} s/step, "
                  f"wall {time.monotonic() - start:.1f} s", flush=True)
    base = results.get("system")
    print(f"\n| {args.model} {args.method}, {args.steps} steps (median of {args.rounds}) | peak RSS (MiB) | s/step | RSS ÷ system | s/step ÷ system |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        if not runs:
            continue
        rss, sec = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        if base:
            rss0, sec0 = statistics.median(r[0] for r in base), statistics.median(r[1] for r in base)
            ratios = f"{rss / rss0:.2f} | {sec / sec0:.2f}"
        else:
            ratios = "- | -"
        print(f"| {name} | {rss:.0f} | {sec:.3f} | {ratios} |")


if __name__ == "__main__":
    main()
