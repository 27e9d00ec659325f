"""A shared app as a hostile second visitor meets it: `python app.py` run as on a Space (SPACE_ID set, no
login), and the app with two `--auth` logins. The first visitor trains; the second (and a client with no
login or cookie at all) gets none of their files, paths, jobs or runs by any URL gradio serves or any API
call, and can neither generate from, publish, download, resume, cancel nor delete them; the owner
downloads and deletes. Then the retention that deletes runs left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from ui_fixtures import run_folder, serve_app, train_form

from space import retention, texts
from space.example import example_images
from space.presets import TOY_MODEL
from space.visitors import COOKIE
from trainer.config import TrainConfig
from trainer.events import CancelToken, PhaseEvent, RunResult, SampleEvent, StepEvent
from trainer.model_files import LORA_WEIGHTS
from trainer.run_folder import KOHYA_LORA_WEIGHTS, sample_path, write_config, write_status

REPO = Path(__file__).resolve().parents[1]
USERS = [("ann", "ann-pass"), ("bob", "bob-pass")]
GENERATE = ["a photo of sks square", "", 5.0, 2, "DDIM", 0, 32, 32, 1, 1.0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def app_on_a_space(tmp_path: Path) -> Iterator[str]:
    """`python app.py` as a Space runs it (SPACE_ID set, no login), its runs in tmp_path/runs; its URL."""
    port, log = _free_port(), (tmp_path / "app.log").open("w")
    env = {**os.environ, "SPACE_ID": "someone/dreambooth", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("DREAMBOOTH_AUTH", None)
    app = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir",
                            str(tmp_path / "runs")], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180  # a hang guard: about 10 s to import and serve
        while True:
            assert app.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the app did not start serving"
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url
    finally:
        app.terminate()
        try:
            app.wait(30)
        except subprocess.TimeoutExpired:
            app.kill()
        log.close()


def wait_until_done(client: Any, seconds: float = 300) -> dict:
    deadline = time.monotonic() + seconds  # a hang guard
    while (job := client.predict(api_name="/job_status"))["state"] in ("queued", "starting", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    return job


def refusals(client: Any, run: str, run_dir: Path) -> list[str]:
    """What `client` is answered when it asks for a run that is not theirs, by every endpoint that takes one."""
    asked = [
        ("/generate", (run, *GENERATE)),  # by name: names only the asker's own runs
        ("/generate", (str(run_dir), *GENERATE)),  # by path: a path on this server
        ("/publish", (run, "sks-square", True, "hf_x")),
        ("/download", ()),
        ("/delete_run", ()),
        ("/resume", ()),
    ]
    answers = []
    for api_name, args in asked:
        with pytest.raises(Exception) as refused:
            client.predict(*args, api_name=api_name)
        answers.append(f"{api_name}: {refused.value}")
    answers.append(client.predict(api_name="/cancel"))
    answers.append(client.predict(False, api_name="/use_checkpoint"))
    return answers


def probe_files(runs_dir: Path, cwd: Path, url: str, **http: Any) -> dict[str, int]:
    """Every file under the runs folder, asked for by each URL form gradio serves files by: {url: status}
    for those answered with anything but a refusal, or with a server path in the refusal."""
    leaks = {}
    with httpx.Client(base_url=url, timeout=30, **http) as client:
        for path in (p for p in runs_dir.rglob("*") if p.is_file()):
            for form in (f"gradio_api/file={path}", f"file={path}", f"gradio_api/file={os.path.relpath(path, cwd)}",
                         f"gradio_api/file={runs_dir}/../{path.relative_to(runs_dir.parent)}"):
                answer = client.get(form)
                if answer.status_code not in (401, 403, 404) or str(runs_dir) in answer.text:
                    leaks[form] = answer.status_code
    return leaks


def test_on_a_space_a_second_visitor_gets_nothing_of_the_first(tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    photos = example_images(tmp_path / "photos")
    form = {**train_form(TOY_MODEL), "images": [handle_file(p) for p in photos], "max_train_steps": 2,
            "validation_steps": 2, "checkpointing_steps": 1000, "use_8bit_adam": False}
    with app_on_a_space(tmp_path) as url:
        cookie = httpx.get(url).cookies[COOKIE]  # the page gives a browser its visitor cookie
        ann = Client(url, verbose=False, httpx_kwargs={"cookies": {COOKIE: cookie}})
        ann.predict(**form, api_name="/train")
        job = wait_until_done(ann)
        assert job["state"] == "completed" and job["samples"], job
        run_dir = run_folder(tmp_path / "runs", job["run"])
        assert run_dir.parent.name.startswith("visitor-") and (run_dir / LORA_WEIGHTS).is_file()
        assert not (run_dir / "instance_images").exists(), "photos not kept are deleted once it completes"
        assert texts.PHOTOS_DELETED in job["message"]
        reloaded = Client(url, verbose=False, httpx_kwargs={"cookies": {COOKIE: cookie}})  # the same browser
        assert reloaded.predict(api_name="/job_status")["run"] == job["run"]

        bob = Client(url, verbose=False)  # another browser
        seen = [json.dumps(bob.predict(api_name="/job_status")), httpx.get(url).text, httpx.get(f"{url}config").text]
        assert json.loads(seen[0])["state"] == "idle"
        assert not [text for text in seen if job["run"] in text or str(tmp_path) in text]
        answers = refusals(bob, job["run"], run_dir)
        assert [a for a in answers if str(tmp_path) in a] == [], answers
        assert answers[-2:] == [texts.NOTHING_TO_CANCEL, texts.NO_SCORED_RUN]
        assert "is a path on this server" in answers[1]  # the asker's own words come back, nothing else
        assert probe_files(tmp_path / "runs", tmp_path, url) == {}

        files = [Path(p) for p in ann.predict(api_name="/download")]  # the owner's weights, from the page's button
        assert [f.name for f in files] == [f"{job['run']}.safetensors", f"{job['run']}-kohya.safetensors"]
        assert files[0].read_bytes() == (run_dir / LORA_WEIGHTS).read_bytes()
        assert load_file(files[1]).keys() == load_file(run_dir / KOHYA_LORA_WEIGHTS).keys()
        assert "Run deleted" in ann.predict(api_name="/delete_run") and not run_dir.exists()


def run_writer(release: threading.Event):
    """A train() stand-in that writes what a LoRA run leaves (config, weights, a sample, run.json) once released."""

    def train(config: TrainConfig, on_event, cancel: CancelToken) -> RunResult:
        run = Path(config.output_dir)
        write_config(run, config)
        on_event(PhaseEvent("training"))
        on_event(StepEvent(1, config.max_train_steps, 0.5, 1e-4, 1.0))
        while not (release.wait(0.01) or cancel.cancelled):
            pass
        save_file({"lora.weight": torch.ones(2, 2)}, run / LORA_WEIGHTS)
        sample = sample_path(run, 1, 0, 0)
        sample.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "purple").save(sample)
        on_event(SampleEvent(1, (sample,)))
        write_status(run, "completed", 1, config.max_train_steps)
        return RunResult(run, "completed", 1, config.max_train_steps, None, None, (sample,))

    return train


def test_with_two_logins_each_has_only_their_own(tmp_path: Path, tiny_model_dir: Path, subject_images: Path) -> None:
    from gradio_client import Client, handle_file

    release = threading.Event()
    form = {**train_form(str(tiny_model_dir)), "images": [handle_file(str(p)) for p in subject_images.glob("*.png")],
            "keep_photos": True}
    with serve_app(tmp_path, tiny_model_dir, auth=USERS, train_fn=run_writer(release)) as (url, services):
        services.set_private(False)  # confined: the base model is the toy model's stand-in, which it may read
        ann, bob = (Client(url, auth=user, verbose=False) for user in USERS)
        ann.predict(**form, api_name="/train")
        assert bob.predict(api_name="/cancel") == texts.NOTHING_TO_CANCEL  # ann's training is not bob's to stop
        assert bob.predict(api_name="/job_status")["state"] == "idle"
        release.set()
        job = wait_until_done(ann)
        run_dir = run_folder(tmp_path / "runs", job["run"])
        assert job["state"] == "completed" and any((run_dir / "instance_images").iterdir()), "kept, as asked"

        seen = json.dumps(bob.predict(api_name="/job_status"))
        assert job["run"] not in seen and str(tmp_path) not in seen
        answers = refusals(bob, job["run"], run_dir)
        assert [a for a in answers if str(tmp_path) in a] == [], answers
        assert probe_files(tmp_path / "runs", tmp_path, url, cookies=bob.cookies) == {}  # bob's login
        assert probe_files(tmp_path / "runs", tmp_path, url) == {}  # no login at all

        download = [Path(p) for p in ann.predict(api_name="/download")]
        assert [p.read_bytes() for p in download] == [(run_dir / LORA_WEIGHTS).read_bytes()]  # no kohya file here
        assert "Run deleted" in ann.predict(api_name="/delete_run") and not run_dir.exists()


def test_runs_left_untouched_past_the_retention_are_deleted(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old, fresh, busy = (runs / "visitor-a" / "old", runs / "visitor-b" / "fresh", runs / "visitor-a" / "busy")
    jobs = runs / ".jobs"
    for folder in (old / "samples", fresh, busy, jobs):
        folder.mkdir(parents=True)
    for folder in (old, fresh, busy):
        (folder / "config.json").write_text("{}")
    (old / "samples" / "step-000001-p0-0.png").write_bytes(b"png")
    (jobs / "old-job1.log").write_text("log")
    (jobs / "new-job2.log").write_text("log")
    now, three_days = time.time(), 3 * 86400
    for path in (old, old / "config.json", old / "samples", old / "samples" / "step-000001-p0-0.png", busy,
                 busy / "config.json", jobs / "old-job1.log"):
        os.utime(path, (now - three_days, now - three_days))

    assert retention.sweep(runs, 2, busy=[busy], now=now) == [old, jobs / "old-job1.log"]
    assert not old.exists() and fresh.exists() and busy.exists() and (jobs / "new-job2.log").exists()
    assert retention.sweep(runs, 2, busy=[], now=now) == [busy]
    assert not (runs / "visitor-a").exists() and (runs / "visitor-b").exists()  # an emptied visitor folder goes


def test_logins_come_from_flags_and_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import app

    monkeypatch.delenv(app.AUTH_ENV, raising=False)
    logins = tmp_path / "logins.txt"
    logins.write_text("# the team\ncarol:c-pass\n\ndan:d:pass\n")
    args = app.parse_args(["--auth", "ann:a", "--auth", "bob:b", "--auth-file", str(logins), "--keep-runs-days", "1"])
    assert args.auth == [("ann", "a"), ("bob", "b"), ("carol", "c-pass"), ("dan", "d:pass")]
    assert args.keep_runs_days == 1 and app.parse_args([]).auth is None
    monkeypatch.setenv(app.AUTH_ENV, "eve:e")
    assert app.parse_args([]).auth == [("eve", "e")]
    for bad in (["--auth", "ann:a", "--auth", "ann:b"], ["--auth-file", str(tmp_path / "none.txt")],
                ["--keep-runs-days", "0"]):
        with pytest.raises(SystemExit):
            app.parse_args(bad)
    logins.write_text("no-colon\n")
    with pytest.raises(SystemExit):
        app.parse_args(["--auth-file", str(logins)])


def test_a_visitor_is_their_login_else_their_hub_login_else_their_browser_else_their_page() -> None:
    from types import SimpleNamespace

    from space.visitors import identify

    token = "A" * 32
    hub = {"oauth_info": {"userinfo": {"preferred_username": "carol"}}}
    asked = [
        SimpleNamespace(username="ann", session=hub, cookies={COOKIE: token}, session_hash="p1"),
        SimpleNamespace(username=None, session=hub, cookies={COOKIE: token}, session_hash="p1"),
        SimpleNamespace(username=None, session={}, cookies={COOKIE: token}, session_hash="p1"),
        SimpleNamespace(username=None, cookies={COOKIE: "forged; not a token"}, session_hash="p1"),
        SimpleNamespace(username=None, session_hash=None),
    ]
    assert [identify(request).id for request in asked] == ["ann", "hub:carol", f"browser:{token}", "page:p1",
                                                            "page:None"]
    assert identify(None) is None  # the app itself, called from Python


def test_a_shared_apps_messages_name_files_not_where_they_lie() -> None:
    from space.errors import error_message

    err = ValueError("`instance_data`: /tmp/gradio/3f2a/dog1.heic is not an image; see https://huggingface.co/docs")
    assert error_message(err, hide_paths=True) == "`instance_data`: dog1.heic is not an image; see https://huggingface.co/docs"
    assert error_message(err) == str(err)  # a private app's user is told where, on their own machine
