"""Fixtures and helpers shared by the UI tests (the app served on a port, the Train form's values).

conftest.py star-imports this module so that pytest finds the fixtures by name; test modules import
the plain helpers (serve_app, train_form, publishing, CPU, GPU16, A100, and for the tests of single
space/ modules form_values, memory_form, fake_train, SDXL_BASE, SECRET) from here, never from one another.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from space.hardware import Hardware
from space.layout import MAX_UPLOAD
from space.presets import ToyModel
from trainer.config import TrainConfig
from trainer.events import CancelToken, PhaseEvent, RunResult, SampleEvent, StepEvent, WarningEvent
from trainer.run_folder import sample_path

__all__ = ["four_images", "toy", "toy_stand_in"]

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SECRET = "hf_secretTokenOfTheJobManagerTests"  # a token that must show up nowhere
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
    from space.layout import Services, app_kwargs, build_app

    services = Services.create(runs_dir=tmp / "runs", train_fn=train_fn, toy_dir=toy_dir or tiny_model_dir,
                               hardware=hardware)
    services.paths.confined = confined
    app = build_app(services)
    app.queue(default_concurrency_limit=1)
    app.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", server_port=None, auth=auth,
               max_file_size=MAX_UPLOAD if confined else None, app_kwargs=app_kwargs())
    try:
        yield app.local_url, services
    finally:
        services.jobs.cancel_all()  # never leave a training (or a queued one) behind
        services.jobs.wait(120)
        app.close()


def run_folder(runs_dir: Path, name: str) -> Path:
    """The folder of the run an API answer names (in its visitor's folder on a shared app)."""
    found = [path for path in Path(runs_dir).glob(f"*/{name}") if path.is_dir()] or [Path(runs_dir) / name]
    assert len(found) == 1 and found[0].is_dir(), (name, found)
    return found[0]


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


@pytest.fixture
def toy(toy_stand_in: Path) -> ToyModel:
    """A ToyModel whose folder is there (an empty stand-in: nothing here loads it)."""
    return ToyModel(toy_stand_in)


@pytest.fixture
def four_images(tmp_path: Path) -> list[str]:
    return [str(tmp_path / f"{i}.png") for i in range(4)]


def form_values(images: list[str], **changes: Any) -> dict[str, Any]:
    """The Train form as the tab hands it over: keys as in space.form.FORM."""
    values: dict[str, Any] = {
        "images": images,
        "identifier": "sks",
        "class_noun": "dog",
        "concept": "object",
        "instance_prompt": "a photo of sks dog",
        "class_prompt": "a photo of dog",
        "method": "lora",
        "base_model": "some/model",
        "with_prior_preservation": False,
        "num_class_images": 50,
        "max_train_steps": 6.0,
        "learning_rate": 1e-4,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "train_text_encoder": True,
        "text_encoder_steps_fraction": 0.3,
        "resolution": 32,
        "use_8bit_adam": True,
        "gradient_checkpointing": False,
        "mixed_precision": "no",
        "seed": 7,
        "checkpointing_steps": 3,
        "validation_prompt": "",
        "validation_steps": 2,
    }
    values.update(changes)
    return values


def memory_form(base_model: str, **changes: Any) -> dict[str, Any]:
    """The form fields the memory line reads, LoRA with every saving by default."""
    return {"base_model": base_model, "method": "lora", "resolution": 1024, "use_8bit_adam": True,
            "gradient_checkpointing": True, "mixed_precision": "fp16", "train_batch_size": 1,
            "train_text_encoder": False, "with_prior_preservation": False, "lora_rank": 16, "preservation": "class-images",
            **changes}


def fake_train(release: threading.Event, fail: Exception | None = None):
    """A train() stand-in: emits the engine's events, waits for `release`, honours cancel."""

    def train(config: TrainConfig, on_event, cancel: CancelToken) -> RunResult:
        on_event(PhaseEvent("loading"))
        if fail is not None:
            raise fail
        on_event(WarningEvent("careful"))
        on_event(PhaseEvent("training"))
        step = 0
        for step in range(1, config.max_train_steps + 1):
            on_event(StepEvent(step, config.max_train_steps, 1.0 / step, 1e-4, 1.0))
            release.wait(5)
            if cancel.cancelled:
                break
        sample = sample_path(Path(config.output_dir), step, 0, 0)
        sample.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "purple").save(sample)
        on_event(SampleEvent(step, (sample,)))
        status = "cancelled" if cancel.cancelled else "completed"
        return RunResult(Path(config.output_dir), status, step, config.max_train_steps, None, None)

    return train
