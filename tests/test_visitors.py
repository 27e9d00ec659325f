"""Many visitors on one served app while a training runs in its own process."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ui_fixtures import TINY_TRAINING, run_folder, serve_app, train_form

pytestmark = pytest.mark.slow

STEPS = 60


def _wait_for(client, predicate, seconds: float = 180) -> dict:
    deadline = time.monotonic() + seconds
    while not predicate(job := client.predict(api_name="/job_status")):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def test_ten_generations_a_second_training_and_a_disconnect_leave_the_training_unaffected(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    """Visitor A starts a training; while it runs, ten other sessions ask for an image each at once,
    an eleventh starts the same training (queued behind A's), and A's session goes away. Every
    generation is answered in the order asked, the app keeps serving, and A's weights equal those of
    the eleventh visitor's identical training, which ran after it with nobody else around."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    form = {**train_form(str(tiny_model_dir)), **TINY_TRAINING, "max_train_steps": STEPS,
            "validation_steps": 1000, "checkpointing_steps": 1000}
    with serve_app(tmp_path, tiny_model_dir) as (url, services):
        ann, eve = Client(url, verbose=False), Client(url, verbose=False)
        assert "step" in ann.predict(images=images, **form, api_name="/train")
        _wait_for(ann, lambda job: job["state"] == "running" and job["step"] >= 1)

        visitors = [Client(url, verbose=False) for _ in range(10)]
        submitted, done_at = [], {}
        for seed, client in enumerate(visitors):
            job = client.submit(str(tiny_model_dir), "a photo of sks square", "", 5.0, 2, "DDIM", seed, 32, 32, 1,
                                1.0, api_name="/generate")
            while job.status().code in (Status.STARTING, Status.JOINING_QUEUE):  # in the queue before the next
                time.sleep(0.01)
            submitted.append(job)
        queued = eve.predict(images=images, **form, api_name="/train")
        assert "Queued" in queued and "next in line" in queued, queued
        ann.close()  # A's page goes away mid-training: the training is the app's, not the page's

        def watch() -> None:
            while len(done_at) < len(submitted):
                for i, job in enumerate(submitted):
                    if i not in done_at and job.done():
                        done_at[i] = time.monotonic()
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        galleries = [job.result(timeout=300) for job in submitted]
        watcher.join(60)
        assert [len(g) for g in galleries] == [1] * 10
        assert len({Path(g[0]["image"]).read_bytes() for g in galleries}) == 10  # ten seeds, ten images
        order = sorted(done_at, key=lambda i: done_at[i])
        assert order == list(range(10)), f"answered in the order {order}"

        first = services.jobs.snapshot(1)
        assert first.state in ("running", "completed") and first.step >= 1, first  # still going, or done
        job = _wait_for(eve, lambda job: job["state"] not in ("queued", "starting", "running"), 300)
        assert job["state"] == "completed" and job["step"] == STEPS, job
        first = services.jobs.snapshot(1)
        assert first.state == "completed" and first.step == STEPS and len(first.losses) == STEPS, first

    runs = (Path(first.run_dir), run_folder(services.runs_dir, job["run"]))
    busy, quiet = (load_file(run / "pytorch_lora_weights.safetensors") for run in runs)
    assert runs[0] != runs[1] and busy.keys() == quiet.keys()
    assert all(torch.equal(busy[k], quiet[k]) for k in busy), "the training amid visitors ended elsewhere"
