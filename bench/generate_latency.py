"""Generate: request-to-image time through our cached pipeline vs calling diffusers directly, and the
app's cold start (process start to the first HTTP 200).

    python bench/generate_latency.py                    # the shipped toy model, 5 + 5 interleaved requests
    python bench/generate_latency.py --model PATH --size 512 --steps 25 --repeats 5
    python bench/generate_latency.py --skip-cold-start
    python bench/generate_latency.py --skip-latency --cold-starts 3   # cold start alone

Both sides use the same loaded pipeline, scheduler (DPM++ 2M), prompt, negative prompt, guidance,
steps, size and per-image seeded CPU generators; ours goes through trainer.inference.generate (its
request check, scheduler swap and pipeline rebuild included), the other calls the pipeline itself.
Runs alternate A B A B after one warm-up each, and the medians are compared. The cold start is
`python app.py` as served.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def latency(model: str, size: int, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from trainer.inference import GenerateRequest, PipelineCache, generate

    pipe = PipelineCache().get(model, "cpu", torch.float32)
    request = GenerateRequest("a photo of a red star on a white background", negative_prompt="blurry",
                              steps=steps, width=size, height=size, seed=0)
    direct = type(pipe)(**{**pipe.components, "scheduler": DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config)}, **({"requires_safety_checker": False} if "requires_safety_checker" in pipe.config
                                     else {}))
    direct.set_progress_bar_config(disable=True)

    def ours() -> None:
        generate(pipe, request)

    def plain() -> None:
        with torch.inference_mode():
            direct(prompt=request.prompt, negative_prompt=request.negative_prompt, num_inference_steps=steps,
                   guidance_scale=request.guidance_scale, width=size, height=size,
                   generator=[torch.Generator().manual_seed(0)])

    ours()
    plain()  # warm-up both
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((ours, a), (plain, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return a, b


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cold_start(timeout: float = 120.0) -> float:
    """Seconds from starting `python app.py` to the first HTTP 200 on its page."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        while time.perf_counter() - start < timeout:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"the app did not answer within {timeout:.0f} s")
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a pipeline folder or run (default: the shipped toy model)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-starts", type=int, default=3)
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    if not args.skip_latency:
        request_latency(args)
    if not args.skip_cold_start:
        starts = [cold_start() for _ in range(args.cold_starts)]
        print(f"app cold start (python app.py to first HTTP 200): median "
              f"{statistics.median(starts):.1f} s over {len(starts)} ({', '.join(f'{s:.1f}' for s in starts)})")


def request_latency(args: argparse.Namespace) -> None:
    from trainer.toyworld import TOY_MODEL_DIR

    model = args.model or str(TOY_MODEL_DIR)
    ours, plain = latency(model, args.size, args.steps, args.repeats)
    mo, mp = statistics.median(ours), statistics.median(plain)
    print(f"model {model}; {args.size} px, {args.steps} steps, DPM++ 2M; {args.repeats} interleaved requests each")
    print("| path | median s | min s | max s |")
    print("|---|---|---|---|")
    print(f"| trainer.inference.generate (cached pipeline) | {mo:.3f} | {min(ours):.3f} | {max(ours):.3f} |")
    print(f"| diffusers pipeline called directly | {mp:.3f} | {min(plain):.3f} | {max(plain):.3f} |")
    print(f"ours / direct: {mo / mp:.3f}")


if __name__ == "__main__":
    main()
