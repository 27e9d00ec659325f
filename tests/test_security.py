"""An app served beyond this machine: local paths confined to the runs folder and the toy model,
uploads limited in size, a login in front of every route, and the Hub token out of what another
visitor's session can see."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from hub_fixtures import CANARY
from hub_server import USER, Account, FakeHub
from ui_fixtures import TINY_TRAINING, publishing, serve_app, train_form

from space.local_paths import LocalPaths
from trainer.config import ConfigError


def test_confined_paths_admit_the_runs_folder_the_toy_model_and_hub_ids_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, toy, elsewhere = tmp_path / "runs", tmp_path / "toy", tmp_path / "elsewhere"
    for folder in (runs / "2026-01-01-sks", toy, elsewhere):
        folder.mkdir(parents=True)
    (runs / "escape").symlink_to(elsewhere)  # inside by name, outside once the link is followed
    paths = LocalPaths([runs, toy])

    admitted = [str(runs / "2026-01-01-sks"), str(toy), "stabilityai/stable-diffusion-2-1", "", "  "]
    assert [v for v in admitted if not paths.allows(v)] == []
    refused = ["/etc", str(elsewhere), str(runs / "escape"), str(runs / ".." / "elsewhere"), "~", "./x", "a\x00b"]
    assert [v for v in refused if paths.allows(v)] == []
    with pytest.raises(ConfigError, match=r"^`base_model`: '/etc' is a path on this server; .*Hub model id"):
        paths.check(" /etc ", "`base_model`")
    assert paths.check("owner/name", "`model`") == "owner/name"

    monkeypatch.chdir(tmp_path)  # a folder named like a Hub id is what diffusers would load: a path, refused
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not paths.allows("owner/name")

    paths.confined = False  # the machine's own user may name any folder
    assert all(paths.allows(v) for v in refused)


def test_a_shared_app_refuses_models_and_runs_outside_its_folders(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    from gradio_client import Client, handle_file

    from space.jobs import JobManager
    from space.publish_tab import PublishDeps, publish_run
    from space.visitors import RunSpace

    outside = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "model")
    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    with serve_app(tmp_path, tiny_model_dir, confined=True) as (url, services):
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match=r"`base_model`: 'model' is a path on this server"):  # no server path
            client.predict(images=images, **train_form(str(outside)), api_name="/train")
        assert services.jobs.snapshot().state == "idle"
        runs = tmp_path / "runs"
        assert not runs.exists() or not any(runs.iterdir()), "a refused training left something behind"

        generate = ["a photo of sks square", "", 5.0, 2, "DDIM", 0, 32, 32, 1, 1.0]
        with pytest.raises(Exception, match=r"`model`: 'model' is a path on this server"):
            client.predict(str(outside), *generate, api_name="/generate")
        gallery = client.predict(str(tiny_model_dir), *generate, api_name="/generate")  # the toy model is allowed
        assert len(gallery) == 1 and os.path.isfile(gallery[0]["image"])

    deps = PublishDeps(RunSpace(runs, LocalPaths([tiny_model_dir])), JobManager())
    with pytest.raises(Exception, match=r"`run`: you have no run named '/.*'. Pick one of your runs"):
        publish_run(deps, str(outside), "sks-square", True, "hf_x")


def _login_page_routes() -> list[tuple[str, str]]:
    """(method, path) of every route gradio serves, read from the FastAPI app of an empty Blocks."""
    import gradio as gr
    from gradio.routes import App

    app = App.create_app(gr.Blocks())
    found = []
    for route in app.routes:
        inner = getattr(route, "original_router", None)  # the API: an included router, paths under /gradio_api
        for sub in inner.routes if inner is not None else [route]:
            for method in sorted(getattr(sub, "methods", None) or {"GET"}):
                if method != "HEAD":
                    found.append((method, sub.path))
    return found


def test_a_login_protects_every_route_including_the_api(tmp_path: Path, tiny_model_dir: Path) -> None:
    from gradio_client import Client

    secret_file = tmp_path / "runs" / "2026-01-01-sks" / "photo.txt"
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text("a visitor's photo")
    markers = ["Instance photos", "job_status", "a visitor's photo", "LoRA scale", str(tmp_path)]
    with serve_app(tmp_path, tiny_model_dir, confined=True, auth=("ann", "s3cret")) as (url, services):
        leaks, statuses = [], {}
        with httpx.Client(base_url=url, timeout=5) as http:
            for method, path in _login_page_routes():
                concrete = re.sub(r"\{[^}]*path[^}]*\}", str(secret_file).lstrip("/"), path)
                concrete = re.sub(r"\{[^}]*\}", "train", concrete)
                try:
                    reply = http.request(method, concrete, json={"data": [], "fn_index": 0, "session_hash": "x"})
                except httpx.ReadTimeout:  # a stream that sends nothing leaks nothing
                    statuses[f"{method} {path}"] = "silent"
                    continue
                statuses[f"{method} {path}"] = reply.status_code
                leaks += [f"{method} {path}: {m}" for m in markers if m in reply.text]
            for route in ["/config", "/gradio_api/info", "/gradio_api/call/train", "/gradio_api/queue/join",
                          "/gradio_api/upload", "/gradio_api/run/job_status", "/gradio_api/api/job_status"]:
                method = "GET" if route in ("/config", "/gradio_api/info") else "POST"
                assert http.request(method, route, json={"data": []}).status_code == 401, route
            login_page = http.get("/").text
            assert '"auth_required":true' in login_page and '"named_endpoints":{}' in login_page
            assert http.post("/login", data={"username": "ann", "password": "wrong"}).status_code == 400
            assert http.post("/login", data={"username": "ann", "password": "s3cret"}).status_code == 200
            assert "Instance photos" in http.get("/").text and http.get("/config").status_code == 200
        assert leaks == [], leaks
        assert len(statuses) > 40 and sum(code == 401 for code in statuses.values()) > 15, statuses
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's own error for a login page
            Client(url, verbose=False).predict(api_name="/job_status")
        job = Client(url, auth=("ann", "s3cret"), verbose=False).predict(api_name="/job_status")
        assert job["state"] == "idle"
        assert services.jobs.snapshot().state == "idle"


def test_a_shared_app_limits_the_size_of_an_upload(tmp_path: Path, tiny_model_dir: Path) -> None:
    with serve_app(tmp_path, tiny_model_dir, confined=True) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        small = http.post("/gradio_api/upload", files={"files": ("a.png", b"x" * 1000)})
        big = http.post("/gradio_api/upload", files={"files": ("b.png", b"x" * (50 * 1024 * 1024 + 1))})
    assert small.status_code == 200 and len(small.json()) == 1
    assert big.status_code == 413 and "52428800 bytes" in big.text, (big.status_code, big.text[:200])


def test_another_visitor_sees_nothing_of_a_publishing_token(
    hub: FakeHub, tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    """Visitor A trains and publishes with a token; visitor B's page, config, API answers and every
    file the app wrote (the job's log, its config) hold no trace of it."""
    from gradio_client import Client, handle_file

    hub.accounts[CANARY] = Account(USER, "write")
    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    short = {**TINY_TRAINING, "max_train_steps": 3, "validation_steps": 1000, "checkpointing_steps": 1000}
    with serve_app(tmp_path, tiny_model_dir) as (url, _):
        a, b = Client(url, verbose=False), Client(url, verbose=False)
        a.predict(images=images, **{**train_form(str(tiny_model_dir)), **short}, **publishing(CANARY), api_name="/train")
        seen_by_b = []
        deadline = time.monotonic() + 120
        while (job := a.predict(api_name="/job_status"))["state"] in ("starting", "running"):
            assert time.monotonic() < deadline, job
            seen_by_b.append(json.dumps(b.predict(api_name="/job_status")))  # B sees only that it has no job
            time.sleep(0.2)
        assert job["state"] == "completed" and job["hub_url"], job
        seen_by_b.append(json.dumps(b.predict(api_name="/job_status")))
        with httpx.Client(base_url=url, timeout=30) as http:
            for route in ["/", "/config", "/gradio_api/info"]:
                seen_by_b.append(http.get(route).text)
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.parent.name == ".jobs" for p in written), "the job's own files are part of the search"
    assert [p for p in written if CANARY.encode() in p.read_bytes()] == []
    assert seen_by_b and not [text for text in seen_by_b if CANARY in text]
