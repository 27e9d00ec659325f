"""Fixtures and helpers shared by the UI tests (the app served on a port, the Train form's values).

conftest.py star-imports this module so that pytest finds the fixtures by name; test modules import
the plain helpers (serve_app, train_form, publishing, CPU, GPU16, A100) from here, never from one another.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from space.hardware import Hardware
from space.layout import MAX_UPLOAD

__all__ = ["toy_stand_in"]

# Injected instead of the machine's own, so that every test sees the same defaults on any host.
CPU = Hardware("cpu", "CPU", None)
A100 = Hardware("cuda", "A100", 80.0, bf16=True)
GPU16 = Hardware("cuda", "Tesla V100-SXM2-16GB", 15.77)  # a 16 GB card as torch reports it (GiB), no bf16

# A training the tiny model finishes in seconds on 2 CPU cores, yet long enough (0.03-0.3 s a step)
# that a second /train call still finds it running.
TINY_TRAINING: dict[str, Any] = {
    "identifier": "sks",
    "class_noun": "square",
    "instance_prompt": "a photo of sks square",
    "max_train_steps": 60,
    "validation_steps": 30,
    "checkpointing_steps": 30,
    "resolution": 32,
    "use_8bit_adam": True,
    "method": "lora",
}


@pytest.fixture
def toy_stand_in(tmp_path: Path) -> Path:
    """A folder that says it is the toy model (an empty model_index.json): for code that lists or
    resolves the toy model and never loads it."""
    folder = tmp_path / "toy-sd"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


@contextmanager
def serve_app(
    tmp: Path, tiny_model_dir: Path, toy_dir: Path | None = None, hardware: Hardware = CPU, *,
    confined: bool = False, auth: tuple[str, str] | None = None, train_fn: Any = None,
) -> Iterator[tuple[str, Any]]:
    """Serve the whole app on a free port, on `hardware`; the session's tiny model stands in for the
    toy model (it is faster) unless `toy_dir` is given. Yields (url, services). Visitors may name any
    local model folder (the tests' models live in temporary folders) unless `confined`, as an app
    served beyond this machine is; `auth` asks for a login; `train_fn` trains in this process instead."""
    from space import login_page
    from space.layout import Services, build_app

    services = Services.create(runs_dir=tmp / "runs", train_fn=train_fn, toy_dir=toy_dir or tiny_model_dir,
                               hardware=hardware)
    services.paths.confined = confined
    app = build_app(services)
    app.queue(default_concurrency_limit=1)
    app.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", server_port=None, auth=auth,
               max_file_size=MAX_UPLOAD if confined else None, app_kwargs=login_page.app_kwargs())
    try:
        yield app.local_url, services
    finally:
        services.jobs.cancel_all()  # never leave a training (or a queued one) behind
        services.jobs.wait(120)
        app.close()


def train_form(base_model: str) -> dict[str, Any]:
    """Every Train form field but the photos by its API name, as a scripted client sends them."""
    return {
        **TINY_TRAINING,
        "concept": "object",
        "class_prompt": "a photo of square",
        "base_model": base_model,
        "with_prior_preservation": False,
        "num_class_images": 10,
        "learning_rate": 1e-4,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "train_text_encoder": False,
        "text_encoder_steps_fraction": 1.0,
        "gradient_checkpointing": False,
        "mixed_precision": "no",
        "seed": 0,
        "validation_prompt": "",
        "lora_rank": 4,
        "cache_latents": True,
        "sample_batch_size": 4,
        "score_checkpoints": False,  # the app's default scores with DINOv2 and CLIP from the Hub
    }


def publishing(token: str) -> dict[str, Any]:
    """The "publish when training finishes" fields of the Train form."""
    return {"publish_to_hub": True, "hub_repo": "sks-square", "hub_private": True, "hub_token": token}
