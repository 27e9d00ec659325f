"""The app with the real engine on the tiny model: the Blocks it builds, then gradio_client driving
a served app through its API (train a few steps, watch the job, generate from the run)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hub_server import READ_TOKEN, USER, Account, FakeHub
from test_hub import CANARY, hub  # noqa: F401  (the fake Hub fixture, used by name)

from space.hardware import DEMO_MODEL, TOY_MODEL
from trainer.toyworld import EXAMPLE_PROMPTS, EXAMPLE_SETTINGS, TOY_MODEL_DIR, TOY_MODEL_LABEL

needs_toy_model = pytest.mark.skipif(
    not (TOY_MODEL_DIR / "model_index.json").is_file(),
    reason=f"the pretrained toy model is not in {TOY_MODEL_DIR} yet (it ships with trainer/toyworld)",
)

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


@contextmanager
def serve_app(tmp: Path, tiny_model_dir: Path, toy_dir: Path | None = None) -> Iterator[tuple[str, Any]]:
    """Serve the whole app on a free port; its demo model is the session's tiny model (copied), which
    also stands in for the toy model (fast, and there before the toy model is) unless `toy_dir` is given."""
    from space.layout import Services, build_app

    cache = tmp / "cache"
    shutil.copytree(tiny_model_dir, cache / "tiny-sd")
    services = Services.create(runs_dir=tmp / "runs", cache_dir=cache, toy_dir=toy_dir or cache / "tiny-sd")
    app = build_app(services)
    app.queue(default_concurrency_limit=1)
    app.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", server_port=None)
    try:
        yield app.local_url, services
    finally:
        services.jobs.cancel()  # never leave a training thread behind
        services.jobs.wait(120)
        app.close()


def test_importing_app_builds_the_ui_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    import app

    assert app.demo.title == "DreamBooth Studio"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # no run, no model built
    assert app._services.jobs.snapshot().state == "idle"
    args = app.parse_args(["--port", "7999", "--auth", "ann:secret", "--runs-dir", "x"])
    assert (args.host, args.port, args.auth, args.runs_dir, args.share) == (
        "127.0.0.1",
        7999,
        ("ann", "secret"),
        Path("x"),
        False,
    )
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])


def test_blocks_build_with_the_real_engine(tmp_path: Path, tiny_model_dir: Path) -> None:
    from space.layout import Services, build_app

    services = Services.create(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    app = build_app(services)
    config = app.get_config_file()
    api_names = {dep.get("api_name") for dep in config["dependencies"]}
    assert {"train", "cancel", "generate", "job_status"} <= api_names
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"Instance photos", "Base model", "Training steps", "8-bit Adam", "Scheduler", "LoRA scale"} <= labels
    assert not services.demo.built  # the demo model is built on first use only
    assert Path(services.demo.resolve(DEMO_MODEL)).joinpath("model_index.json").is_file()
    assert services.demo.resolve("user/model") == "user/model"


def test_on_a_cpu_space_it_offers_to_duplicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from space.hardware import SpaceInfo, default_runs_dir
    from space.layout import Services, build_app

    monkeypatch.setenv("SPACE_ID", "ann/dreambooth-studio")
    monkeypatch.delenv("DREAMBOOTH_RUNS_DIR", raising=False)
    services = Services.create(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    config = build_app(services).get_config_file()
    texts = " ".join(str(c["props"].get("value")) for c in config["components"])
    if not services.hardware.has_gpu:
        assert "Duplicate this Space" in texts and "ann/dreambooth-studio?duplicate=true" in texts
        assert "Duplicate Space" in texts  # gr.DuplicateButton
    assert default_runs_dir(SpaceInfo("ann/x", persistent_storage=True)) == Path("/data/runs")
    assert default_runs_dir(SpaceInfo(None, persistent_storage=True)) == Path("runs")


def _component(config: dict[str, Any], elem_id: str) -> dict[str, Any] | None:
    return next((c for c in config["components"] if c["props"].get("elem_id") == elem_id), None)


def test_try_the_example_fills_the_form(tmp_path: Path) -> None:
    from space.layout import Services, build_app

    stand_in = tmp_path / "toy-sd"  # the handler loads no model: a folder that says it is one will do
    stand_in.mkdir()
    (stand_in / "model_index.json").write_text("{}")
    services = Services.create(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", toy_dir=stand_in)
    app = build_app(services)
    assert _component(app.get_config_file(), "try-example") is not None
    (try_example,) = [f.fn for f in app.fns.values() if f.name == "try_example"]

    filled = {
        getattr(c, "label", None) or getattr(c, "elem_id", None) or type(c).__name__: v
        for c, v in try_example().items()
    }
    photos = filled["Instance photos"]
    assert len(photos) == 5 and filled["Preview"] == photos and filled["image-count"] == "**5** photos"
    assert all(Path(p).parent == tmp_path / "runs" / "example-subject" and Path(p).is_file() for p in photos)
    assert (filled["Identifier"], filled["Class noun"], filled["Base model"]) == ("sks", "star", TOY_MODEL)
    assert (filled["Instance prompt"], filled["Class prompt"]) == (
        EXAMPLE_SETTINGS["instance_prompt"],
        EXAMPLE_SETTINGS["class_prompt"],
    )
    for label, field in [
        ("Training steps", "max_train_steps"),
        ("Learning rate", "learning_rate"),
        ("Method", "method"),
        ("Resolution", "resolution"),
        ("Class images", "num_class_images"),
        ("Batch size", "train_batch_size"),
    ]:
        assert filled[label] == EXAMPLE_SETTINGS[field], label
    assert filled["Prior preservation"] == EXAMPLE_SETTINGS.get("with_prior_preservation", False)
    assert filled["Validation prompt"] == EXAMPLE_PROMPTS[1]
    assert not services.demo.built and not list(tmp_path.glob("runs/2*"))  # no model built, no run made

    # Until the toy model is there, the tiny model is the demo model and there is no example to try.
    fallback = Services.create(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", toy_dir=tmp_path / "none")
    config = build_app(fallback).get_config_file()
    assert _component(config, "try-example") is None
    first = tuple(_component(config, "base-model")["props"]["choices"][0])
    assert first == ("Tiny demo model (built locally, runs on CPU)", DEMO_MODEL)


@needs_toy_model
def test_the_example_trains_on_the_toy_model_through_the_api(tmp_path: Path, tiny_model_dir: Path) -> None:
    from gradio_client import Client, handle_file

    from space.example import example_form, example_images
    from space.layout import Services, build_app
    from trainer.config import TrainConfig

    real = Services.create(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")  # the shipped toy model
    base_model = _component(build_app(real).get_config_file(), "base-model")["props"]
    if not real.hardware.has_gpu:
        assert tuple(base_model["choices"][0]) == (TOY_MODEL_LABEL, TOY_MODEL) and base_model["value"] == TOY_MODEL

    values = example_form(example_images(tmp_path / "example"))
    values["images"] = [handle_file(p) for p in values["images"]]
    short = {"max_train_steps": 4, "validation_steps": 1000, "with_prior_preservation": False}
    with serve_app(tmp_path, tiny_model_dir, toy_dir=TOY_MODEL_DIR) as (url, services):
        client = Client(url, verbose=False)
        client.predict(**{**values, **short}, api_name="/train")
        job = services.jobs.wait(120).as_dict()
        assert job["state"] == "completed" and job["step"] == 4, job
        run_dir = Path(job["run_dir"])
        run = TrainConfig.load(run_dir / "config.json")
        assert Path(run.pretrained_model) == TOY_MODEL_DIR and run.lora_rank == EXAMPLE_SETTINGS["lora_rank"]
        gallery = client.predict(
            str(run_dir), EXAMPLE_PROMPTS[1], "", 5.0, 2, "DDIM", 0, 32, 32, 1, 1.0, api_name="/generate"
        )
        assert len(gallery) == 1 and os.path.isfile(gallery[0]["image"])


def test_gradio_client_trains_then_generates(tmp_path: Path, tiny_model_dir: Path, subject_images: Path) -> None:
    from gradio_client import Client, handle_file

    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    with serve_app(tmp_path, tiny_model_dir) as (url, services):
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="must contain the identifier"):  # the engine's words, as gr.Error
            client.predict(images=images, **{**_form(), "instance_prompt": "a photo of a square"}, api_name="/train")
        status = client.predict(images=images, **_form(), api_name="/train")
        assert "step" in status
        with pytest.raises(Exception, match="already running"):  # a second visitor is told it is busy
            client.predict(images=images, **_form(), api_name="/train")
        deadline = time.monotonic() + 120
        while (job := client.predict(api_name="/job_status"))["state"] in ("starting", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "completed", job
        steps = TINY_TRAINING["max_train_steps"]
        assert job["step"] == steps and len(job["losses"]) == steps and job["samples"]
        run_dir = Path(job["run_dir"])
        assert (run_dir / "pytorch_lora_weights.safetensors").is_file() and run_dir.parent == tmp_path / "runs"

        gallery = client.predict(
            str(run_dir),
            "a photo of sks square",
            "",
            7.5,
            2,
            "Euler ancestral",
            3,
            32,
            32,
            2,
            1.0,
            api_name="/generate",
        )
        assert len(gallery) == 2 and all(os.path.isfile(item["image"]) for item in gallery)
        with pytest.raises(Exception, match="multiples of 8"):
            client.predict(str(run_dir), "x", "", 7.5, 2, "DDIM", 0, 30, 32, 1, 1.0, api_name="/generate")


# --- publish when training finishes (the fake Hub of test_hub.py, over HTTP) ----------------------
@pytest.mark.parametrize(("token", "words"), [("hf_notAValidToken", "401 Unauthorized"), (READ_TOKEN, "read-only")])
def test_publishing_with_a_bad_token_fails_in_seconds_before_training(
    hub: FakeHub,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    tiny_model_dir: Path,
    subject_images: Path,
    token: str,
    words: str,
) -> None:
    from gradio_client import Client, handle_file

    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    with serve_app(tmp_path, tiny_model_dir) as (url, services):
        client = Client(url, verbose=False)
        began = time.monotonic()
        with pytest.raises(Exception, match=words):
            client.predict(images=images, **_form(), **_publishing(token), api_name="/train")
        assert time.monotonic() - began < 10
        assert services.jobs.snapshot().state == "idle"
        runs = tmp_path / "runs"
        assert not runs.exists() or not any(runs.iterdir()), "a run folder was made although the token was refused"
    assert hub.repos == {} and [r for r in hub.requests if r[1] != "/api/whoami-v2"] == []


def test_publishing_when_training_finishes_puts_the_run_on_the_hub_and_the_token_nowhere(
    hub: FakeHub,  # noqa: F811
    tmp_path: Path,
    tiny_model_dir: Path,
    subject_images: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from gradio_client import Client, handle_file

    hub.accounts[CANARY] = Account(USER, "write")
    caplog.set_level(logging.DEBUG)
    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    short = {"max_train_steps": 4, "validation_steps": 1000, "checkpointing_steps": 1000}
    with serve_app(tmp_path, tiny_model_dir) as (url, services):
        client = Client(url, verbose=False)
        statuses = [client.predict(images=images, **{**_form(), **short}, **_publishing(CANARY), api_name="/train")]
        deadline = time.monotonic() + 120
        while (job := client.predict(api_name="/job_status"))["state"] in ("starting", "running"):
            assert time.monotonic() < deadline, job
            statuses.append(json.dumps(job))
            time.sleep(0.2)
        statuses.append(json.dumps(job))
        snapshot = services.jobs.snapshot()

    repo_id = f"{USER}/sks-square"
    assert job["state"] == "completed" and job["publish_error"] is None, job
    assert job["hub_url"] == f"{hub.url}/{repo_id}" and f"Published to [{repo_id}]" in job["message"]
    assert hub.repos[repo_id].private is True
    files = hub.files(repo_id)
    assert {"pytorch_lora_weights.safetensors", "README.md", "config.json"} <= set(files)
    run_dir = Path(job["run_dir"])
    assert files["pytorch_lora_weights.safetensors"] == (run_dir / "pytorch_lora_weights.safetensors").read_bytes()
    # The token reached the Hub (whoami before training, then the upload) and nothing else.
    out, err = capfd.readouterr()
    places = {"stdout": out, "stderr": err, "logs": caplog.text, "snapshot": repr(snapshot), "api": "\n".join(statuses)}
    for path in (p for p in run_dir.rglob("*") if p.is_file()):
        places[f"run:{path.relative_to(run_dir).as_posix()}"] = path.read_bytes().decode("latin-1")
    places.update({f"hub:{p}": data.decode("latin-1") for p, data in files.items()})
    assert [name for name, text in places.items() if CANARY in text] == []
    assert {"run:config.json", "run:README.md"} <= set(places) and any(n.startswith("run:logs/") for n in places)


def _publishing(token: str) -> dict[str, Any]:
    return {"publish_to_hub": True, "hub_repo": "sks-square", "hub_private": True, "hub_token": token}


def _form() -> dict[str, Any]:
    """Every Train form field by its API name, as a scripted client sends them."""
    return {
        **TINY_TRAINING,
        "concept": "object",
        "class_prompt": "a photo of square",
        "base_model": DEMO_MODEL,
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
    }
