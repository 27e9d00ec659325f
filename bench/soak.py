"""Soak: the app under a bounded stream of requests on 127.0.0.1 for a few minutes; its memory
should stay flat.

    python bench/soak.py                      # 3 minutes, 3 visitors at a time
    python bench/soak.py --minutes 10 --visitors 4
    python bench/soak.py --kinds status --session-every 1     # what one new session costs
    python bench/soak.py --minutes 5 --max-sessions 100       # the app's session cap reached

Starts `python app.py` on a free port with a throw-away runs folder (the shipped toy model), then
keeps `--visitors` threads busy, each one request at a time (so the stream is bounded by the app's
own pace): a generation on the toy model, the job status, the page and its config, and every fifth
request a new session (a new gradio_client Client, as a new browser tab would be). The app's RSS is
sampled every few seconds; the first sample is taken after a warm-up (the toy pipeline loaded, one
image drawn by each visitor), as nothing before it is steady state. It prints the RSS at start and end,
the highest, the requests answered and the errors.

Gradio keeps each session's page state (~220 KB here) until `--max-sessions` newer ones have come:
the RSS climbs by that much per new session until the cap, then stays flat.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from generate_latency import REPO, free_port

sys.path.insert(0, str(REPO))

from space.presets import TOY_MODEL  # noqa: E402


def serve(port: int, runs_dir: Path, app_args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir", str(runs_dir),
                             *app_args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the app did not answer within 180 s")


def rss_mb(proc: psutil.Process) -> float:
    """The app and any process it started (none unless a training runs)."""
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


KINDS = ("generate", "status", "page", "config")


def visitor(url: str, until: float, counts: dict, lock: threading.Lock, seed: int,
            kinds: tuple[str, ...] = KINDS, session_every: int = 5) -> None:
    from gradio_client import Client

    client, n = None, 0
    while time.monotonic() < until:
        if n % session_every == 0:
            if client is not None:
                client.close()
            client = Client(url, verbose=False)  # a new tab: a new session
        try:
            match kinds[n % len(kinds)]:
                case "generate":
                    client.predict(TOY_MODEL, "a photo of a red circle", "", 5.0, 4, "DDIM", seed + n, 32, 32, 1, 1.0,
                                   api_name="/generate")
                case "status":
                    client.predict(api_name="/job_status")
                case "page":
                    urllib.request.urlopen(url, timeout=30).read()
                case "config":
                    urllib.request.urlopen(url + "config", timeout=30).read()
            key = "answered"
        except Exception as err:  # counted and shown, the soak goes on
            key = "errors"
            print(f"  error: {type(err).__name__}: {str(err)[:160]}", file=sys.stderr)
        with lock:
            counts[key] += 1
        n += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--visitors", type=int, default=3)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"requests to take turns with, of {KINDS}")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="the app's --max-sessions (its default otherwise)")
    parser.add_argument("--session-every", type=int, default=5, help="a new session every N requests")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory() as tmp:
        app_args = [] if args.max_sessions is None else ["--max-sessions", str(args.max_sessions)]
        app = serve(port, Path(tmp) / "runs", app_args)
        proc = psutil.Process(app.pid)
        try:
            print(f"app up; RSS {rss_mb(proc):.0f} MB before any request")
            # One generation per visitor loads the pipeline and warms the path.
            threads = [threading.Thread(target=_one_generation, args=(url, i)) for i in range(args.visitors)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            counts, lock = {"answered": 0, "errors": 0}, threading.Lock()
            until = time.monotonic() + args.minutes * 60
            workers = [threading.Thread(target=visitor, args=(url, until, counts, lock, 1000 * i,
                                                                   tuple(args.kinds.split(",")), args.session_every))
                       for i in range(args.visitors)]
            samples = [(0.0, rss_mb(proc))]
            began = time.monotonic()
            for w in workers:
                w.start()
            while time.monotonic() < until:
                time.sleep(min(args.every, max(0.0, until - time.monotonic())))
                samples.append((time.monotonic() - began, rss_mb(proc)))
            for w in workers:
                w.join()
            samples.append((time.monotonic() - began, rss_mb(proc)))
            alive = app.poll() is None
        finally:
            app.terminate()
            app.wait(30)

    start, end = samples[0][1], samples[-1][1]
    print(f"{args.visitors} visitors for {args.minutes:g} min: {counts['answered']} requests answered "
          f"({counts['answered'] / (samples[-1][0] or 1):.1f}/s), {counts['errors']} errors; app alive: {alive}")
    print(f"app RSS after warm-up {start:.0f} MB, at the end {end:.0f} MB ({end - start:+.0f} MB, "
          f"{(end / start - 1) * 100:+.1f}%), highest {max(r for _, r in samples):.0f} MB")
    print("samples (s, MB): " + ", ".join(f"{t:.0f}:{r:.0f}" for t, r in samples))


def _one_generation(url: str, seed: int) -> None:
    from gradio_client import Client

    Client(url, verbose=False).predict(TOY_MODEL, "a photo of a red circle", "", 5.0, 4, "DDIM", seed, 32, 32, 1, 1.0,
                                       api_name="/generate")


if __name__ == "__main__":
    main()
