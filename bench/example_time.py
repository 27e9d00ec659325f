"""How long "Try the example" takes, end to end, and where the time goes.

Serves the whole app on 127.0.0.1 (the shipped toy model, trainings in their own process as the app
runs them), presses Start with the example's form through gradio_client as the page's button does, and
follows `/job_status` until the run ends. Prints the wall time from the click to the end, split by the
phase the job reported: start-up (the child process imports and loads the model), class images,
caching, training steps, scoring (the base model and each scored checkpoint), saving.

    python bench/example_time.py            # quiet machine: nothing else running
    python bench/example_time.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POLL_SECONDS = 0.2


def phase_of(job: dict) -> str:
    """The phase a /job_status answer is in, as the breakdown names it."""
    if job["state"] in ("queued", "starting") or job["phase"] in ("", "starting", "loading"):
        return "start-up"
    return {"class-images": "class images", "training": "steps"}.get(job["phase"], job["phase"])


def follow(client, deadline: float) -> tuple[float, dict[str, float], dict]:
    """Poll until the job ends: (seconds from now, seconds by phase, the last answer)."""
    start = last = time.monotonic()
    spent: dict[str, float] = defaultdict(float)
    phase = "start-up"
    while True:
        job = client.predict(api_name="/job_status")
        now = time.monotonic()
        spent[phase] += now - last
        last, phase = now, phase_of(job)
        if job["state"] not in ("queued", "starting", "running"):
            return now - start, dict(spent), job
        if now > deadline:
            raise TimeoutError(f"the example still runs after {now - start:.0f} s: {job}")
        time.sleep(POLL_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--timeout", type=float, default=1800, help="Give up after this many seconds.")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    from space.example import example_form, example_images
    from space.hardware import detect_hardware
    from space.layout import Services, app_kwargs, build_app

    with tempfile.TemporaryDirectory() as tmp:
        services = Services.create(runs_dir=Path(tmp) / "runs", hardware=detect_hardware())
        app = build_app(services)
        app.queue(default_concurrency_limit=1)
        app.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", server_port=None,
                   app_kwargs=app_kwargs())
        try:
            form = example_form(example_images(Path(tmp) / "runs" / "example-subject"))
            form["images"] = [handle_file(p) for p in form["images"]]
            client = Client(app.local_url, verbose=False)
            clicked = time.monotonic()
            client.predict(**form, api_name="/train")  # answers once the child reports its first phase
            waited, spent, job = follow(client, clicked + args.timeout)
            total = time.monotonic() - clicked
            spent["start-up"] = spent.get("start-up", 0.0) + (total - waited)
        finally:
            services.jobs.cancel_all()
            app.close()

    print(f"example: {job['state']}, {job['step']}/{job['total']} steps, pick {job['pick']} "
          f"({job['pick_reason']})")
    print(f"{'phase':<14}{'seconds':>9}{'share':>8}")
    for phase, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"{phase:<14}{seconds:>9.1f}{seconds / total:>8.0%}")
    print(f"{'total':<14}{total:>9.1f}   (machine: {os.cpu_count()} cores)")
    if args.json:
        args.json.write_text(json.dumps({"total": total, "phases": spent, "job": job}, indent=1))


if __name__ == "__main__":
    main()
