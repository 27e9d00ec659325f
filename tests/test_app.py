"""The app with the real engine on the tiny model: the Blocks it builds, then gradio_client driving
a served app through its API (train a few steps, watch the job, generate from the run)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hub_fixtures import CANARY
from hub_server import READ_TOKEN, USER, Account, FakeHub
from ui_fixtures import CPU, GPU16, TINY_TRAINING, publishing, run_folder, serve_app, train_form

from space.presets import TOY_MODEL
from trainer.config import ConfigError
from trainer.run_folder import scored_images
from trainer.toyworld import EXAMPLE_PROMPTS, EXAMPLE_SETTINGS, TOY_MODEL_DIR, TOY_MODEL_LABEL


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
        [("ann", "secret")],
        Path("x"),
        False,
    )
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])
    assert args.max_sessions == 500 and app.parse_args(["--max-sessions", "20"]).max_sessions == 20
    with pytest.raises(SystemExit):
        app.parse_args(["--max-sessions", "0"])


def test_blocks_build_with_the_real_engine(tmp_path: Path) -> None:
    from space.layout import Services, build_app

    services = Services.create(runs_dir=tmp_path / "runs", hardware=CPU)
    app = build_app(services)
    config = app.get_config_file()
    api_names = {dep.get("api_name") for dep in config["dependencies"]}
    assert {"train", "cancel", "generate", "job_status"} <= api_names
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"Instance photos", "Base model", "Training steps", "8-bit Adam", "Scheduler", "LoRA scale"} <= labels
    assert services.toy.resolve(TOY_MODEL) == str(TOY_MODEL_DIR)  # the shipped toy model, nothing built
    assert Path(services.toy.resolve(TOY_MODEL)).joinpath("model_index.json").is_file()
    assert services.toy.resolve("user/model") == "user/model"


def test_the_generate_widgets_take_the_engines_defaults_and_ranges(tmp_path: Path) -> None:
    from space.layout import Services, build_app
    from trainer.inference import MAX_IMAGES, MAX_LORA_SCALE, MAX_SIZE, MAX_STEPS, GenerateRequest

    config = build_app(Services.create(runs_dir=tmp_path / "runs", hardware=CPU)).get_config_file()
    by_label = {c["props"].get("label"): c["props"] for c in config["components"] if c["type"] != "gallery"}
    engine = GenerateRequest(prompt="")
    assert (_component(config, "generate-steps")["props"]["maximum"], by_label["Steps"]["value"]) == (
        MAX_STEPS,
        engine.steps,
    )
    assert (by_label["LoRA scale"]["maximum"], by_label["LoRA scale"]["value"]) == (MAX_LORA_SCALE, engine.lora_scale)
    assert (by_label["Images"]["maximum"], by_label["Guidance scale"]["value"]) == (MAX_IMAGES, engine.guidance_scale)
    assert (
        _component(config, "width")["props"]["maximum"] == MAX_SIZE == _component(config, "height")["props"]["maximum"]
    )
    assert by_label["Scheduler"]["value"] == engine.scheduler


def test_the_train_form_offers_sdxl_lora_rank_and_a_memory_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from space.layout import Services, build_app

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the page as online: a real base model first (nothing is fetched)
    config = build_app(Services.create(runs_dir=tmp_path / "runs", hardware=GPU16)).get_config_file()
    choices = [tuple(c) for c in _component(config, "base-model")["props"]["choices"]]
    assert ("stabilityai/stable-diffusion-xl-base-1.0",) * 2 in choices
    assert _component(config, "lora-rank")["props"]["value"] == 4  # SD 1.5's, the default base on a GPU
    note, picked = _component(config, "memory-note")["props"], _component(config, "memory-pick")["props"]
    assert note["visible"] and "Fits your GPU" in note["value"]  # the picked presets fit this card
    assert picked["visible"] and "Picked for your GPU" in picked["value"]
    labels = {c["props"].get("label") for c in config["components"]}
    assert {"LoRA rank", "Cache latents"} <= labels

    cpu = build_app(Services.create(runs_dir=tmp_path / "runs", hardware=CPU)).get_config_file()
    assert _component(cpu, "lora-rank")["props"]["value"] == EXAMPLE_SETTINGS["lora_rank"]  # the toy model's
    assert not _component(cpu, "memory-note")["props"]["visible"]  # no GPU to size for


def test_on_a_cpu_space_it_offers_to_duplicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from space.hardware import SpaceInfo, default_runs_dir
    from space.layout import Services, build_app

    monkeypatch.setenv("SPACE_ID", "ann/dreambooth-studio")
    monkeypatch.delenv("DREAMBOOTH_RUNS_DIR", raising=False)
    services = Services.create(runs_dir=tmp_path / "runs", hardware=CPU)
    config = build_app(services).get_config_file()
    texts = " ".join(str(c["props"].get("value")) for c in config["components"])
    assert "Duplicate this Space" in texts and "ann/dreambooth-studio?duplicate=true" in texts
    assert "Duplicate Space" in texts  # gr.DuplicateButton
    assert default_runs_dir(SpaceInfo("ann/x", persistent_storage=True)) == Path("/data/runs")
    assert default_runs_dir(SpaceInfo(None, persistent_storage=True)) == Path("runs")


def _component(config: dict[str, Any], elem_id: str) -> dict[str, Any] | None:
    return next((c for c in config["components"] if c["props"].get("elem_id") == elem_id), None)


def test_try_the_example_fills_the_form(tmp_path: Path, toy_stand_in: Path) -> None:
    from space.jobs import JobManager
    from space.layout import Services, build_app
    from space.presets import ToyModel
    from space.train_tab import TrainDeps, try_example

    services = Services.create(runs_dir=tmp_path / "runs", toy_dir=toy_stand_in, hardware=CPU)
    assert _component(build_app(services).get_config_file(), "try-example") is not None
    # The handler loads no model: a folder that says it is one will do.
    filled = try_example(TrainDeps(JobManager(), tmp_path / "runs", ToyModel(toy_stand_in), CPU))

    photos = filled["images"]
    assert len(photos) == 5 and filled["preview"] == photos and filled["count"] == "**5** photos"
    assert filled["n_images"] == 5
    assert all(Path(p).parent == tmp_path / "runs" / "example-subject" and Path(p).is_file() for p in photos)
    assert (filled["identifier"], filled["class_noun"], filled["base_model"]) == ("sks", "star", TOY_MODEL)
    assert (filled["instance_prompt"], filled["class_prompt"]) == (
        EXAMPLE_SETTINGS["instance_prompt"],
        EXAMPLE_SETTINGS["class_prompt"],
    )
    for field in [
        "max_train_steps",
        "learning_rate",
        "method",
        "resolution",
        "num_class_images",
        "train_batch_size",
    ]:
        assert filled[field] == EXAMPLE_SETTINGS[field], field
    assert filled["with_prior_preservation"] == EXAMPLE_SETTINGS.get("with_prior_preservation", False)
    assert filled["validation_prompt"] == EXAMPLE_PROMPTS[1]
    assert not list(tmp_path.glob("runs/2*"))  # no run made

    # Without its folder, the toy model is still what the app offers, and the page says it is missing.
    missing = Services.create(runs_dir=tmp_path / "runs", toy_dir=tmp_path / "none", hardware=CPU)
    config = build_app(missing).get_config_file()
    first = tuple(_component(config, "base-model")["props"]["choices"][0])
    assert first == (TOY_MODEL_LABEL, TOY_MODEL)
    assert any("The toy model is missing" in str(c["props"].get("value")) for c in config["components"])
    with pytest.raises(ConfigError, match="toy model is not installed"):
        missing.toy.resolve(TOY_MODEL)


def test_the_example_trains_on_the_toy_model_through_the_api(tmp_path: Path, tiny_model_dir: Path) -> None:
    from gradio_client import Client, handle_file

    from space.example import example_form, example_images
    from space.layout import Services, build_app
    from trainer.config import TrainConfig

    real = Services.create(runs_dir=tmp_path / "runs", hardware=CPU)  # the shipped toy model
    base_model = _component(build_app(real).get_config_file(), "base-model")["props"]
    assert tuple(base_model["choices"][0]) == (TOY_MODEL_LABEL, TOY_MODEL) and base_model["value"] == TOY_MODEL

    values = example_form(example_images(tmp_path / "example"))
    values["images"] = [handle_file(p) for p in values["images"]]
    short = {"max_train_steps": 4, "validation_steps": 1000, "with_prior_preservation": False}
    with serve_app(tmp_path, tiny_model_dir, toy_dir=TOY_MODEL_DIR) as (url, services):
        client = Client(url, verbose=False)
        client.predict(**{**values, **short}, api_name="/train")
        job = services.jobs.wait(600).as_dict()  # a hang guard: seconds on an idle machine
        assert job["state"] == "completed" and job["step"] == 4, job
        # Scored by the toy world's judge, as the example is: the base model, and the last step (~3 s each).
        assert [row["step"] for row in job["scores"]] == [0, 4] and job["pick_reason"], job
        run_dir = run_folder(services.runs_dir, job["run"])
        run = TrainConfig.load(run_dir / "config.json")
        assert Path(run.pretrained_model) == TOY_MODEL_DIR and run.lora_rank == EXAMPLE_SETTINGS["lora_rank"]
        # What the scorer drew of the instance prompt at each scored step stays beside the scores (not the base's).
        assert len(scored_images(run_dir, 4)) == run.score_samples and not scored_images(run_dir, 0)
        gallery = client.predict(
            job["run"], EXAMPLE_PROMPTS[1], "", 5.0, 2, "DDIM", 0, 32, 32, 1, 1.0, api_name="/generate"
        )
        assert len(gallery) == 1 and os.path.isfile(gallery[0]["image"])


def test_gradio_client_trains_then_generates(tmp_path: Path, tiny_base, tiny_model_dir: Path,
                                             subject_images: Path) -> None:
    """For each model family: the same form, the same endpoints, the run in its family's pipeline."""
    from gradio_client import Client, handle_file

    from trainer.run_folder import read_status

    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    form = train_form(str(tiny_base.path))
    with serve_app(tmp_path, tiny_model_dir) as (url, services):
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="must contain the identifier"):  # the engine's words, as gr.Error
            client.predict(images=images, **{**form, "instance_prompt": "a photo of a square"}, api_name="/train")
        status = client.predict(images=images, **form, api_name="/train")
        assert "step" in status
        queued = client.predict(images=images, **form, api_name="/train")  # a second Start waits in the queue
        assert "Queued" in queued and "next in line" in queued, queued
        assert client.predict(api_name="/cancel") == "Withdrawn from the queue."  # its owner withdraws it
        deadline = time.monotonic() + 300  # a hang guard: about 20 s on an idle 2-core machine
        while (job := client.predict(api_name="/job_status"))["state"] in ("starting", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["state"] == "completed", job
        steps = TINY_TRAINING["max_train_steps"]
        assert job["step"] == steps and len(job["losses"]) == steps and job["samples"]
        run_dir = run_folder(services.runs_dir, job["run"])
        assert (run_dir / "pytorch_lora_weights.safetensors").is_file() and run_dir.parent.parent == tmp_path / "runs"
        assert read_status(run_dir)["family"] == tiny_base.family

        gallery = client.predict(
            job["run"],  # one of this visitor's runs, by name
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
        assert type(services.pipelines.get(str(run_dir))) is tiny_base.pipeline_class  # the one it drew with
        with pytest.raises(Exception, match="multiples of 8"):
            client.predict(str(run_dir), "x", "", 7.5, 2, "DDIM", 0, 30, 32, 1, 1.0, api_name="/generate")


# --- publish when training finishes (the fake Hub of hub_fixtures.py, over HTTP) ------------------
@pytest.mark.parametrize(("token", "words"), [("hf_notAValidToken", "401 Unauthorized"), (READ_TOKEN, "read-only")])
def test_publishing_with_a_bad_token_fails_in_seconds_before_training(
    hub: FakeHub,
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
            client.predict(images=images, **train_form(str(tiny_model_dir)), **publishing(token), api_name="/train")
        assert time.monotonic() - began < 10
        assert services.jobs.snapshot().state == "idle"
        runs = tmp_path / "runs"
        assert not runs.exists() or not any(runs.iterdir()), "a run folder was made although the token was refused"
    assert hub.repos == {} and [r for r in hub.requests if r[1] != "/api/whoami-v2"] == []


def test_publishing_when_training_finishes_puts_the_run_on_the_hub_and_the_token_nowhere(
    hub: FakeHub,
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
        form = {**train_form(str(tiny_model_dir)), **short}
        statuses = [client.predict(images=images, **form, **publishing(CANARY), api_name="/train")]
        deadline = time.monotonic() + 300  # a hang guard: about 20 s on an idle 2-core machine
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
    run_dir = Path(snapshot.run_dir)
    assert files["pytorch_lora_weights.safetensors"] == (run_dir / "pytorch_lora_weights.safetensors").read_bytes()
    # The token reached the Hub (whoami before training, then the upload) and nothing else.
    out, err = capfd.readouterr()
    places = {"stdout": out, "stderr": err, "logs": caplog.text, "snapshot": repr(snapshot), "api": "\n".join(statuses)}
    for path in (p for p in run_dir.rglob("*") if p.is_file()):
        places[f"run:{path.relative_to(run_dir).as_posix()}"] = path.read_bytes().decode("latin-1")
    places.update({f"hub:{p}": data.decode("latin-1") for p, data in files.items()})
    assert [name for name, text in places.items() if CANARY in text] == []
    assert {"run:config.json", "run:README.md"} <= set(places) and any(n.startswith("run:logs/") for n in places)
