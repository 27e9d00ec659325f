"""Fair use on a shared app (space.fair_use): one training at a time per visitor, a step and a time cap per
training, a work cap per generation, controls that never wait behind a generation, and refused values
answered with the field's name: tested on the whole app served on 127.0.0.1 with two logins, as a
shared app (Services.set_private(False), what app.py does off a private machine)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ui_fixtures import serve_app, train_form

from app import fair_use_caps, parse_args
from space import texts
from space.fair_use import SHARED_MAX_STEPS, FairUse, FairUseError
from space.jobs import JobManager
from space.presets import TOY_MODEL
from trainer.config import TrainConfig
from trainer.events import CancelToken, PhaseEvent, RunResult, StepEvent

USERS = [("ann", "ann-pass"), ("bob", "bob-pass")]


def held_training(release: threading.Event):
    """A train() stand-in that runs until released or cancelled, a step each 10 ms."""

    def train(config: TrainConfig, on_event, cancel: CancelToken) -> RunResult:
        on_event(PhaseEvent("training"))
        step = 0
        while not (release.is_set() or cancel.cancelled):
            step = min(step + 1, config.max_train_steps)
            on_event(StepEvent(step, config.max_train_steps, 1.0, 1e-4, 1.0))
            time.sleep(0.01)
        return RunResult(Path(config.output_dir), "cancelled" if cancel.cancelled else "completed", step,
                         config.max_train_steps, None, None)

    return train


@contextmanager
def shared_app(tmp_path: Path, tiny_model_dir: Path, release: threading.Event) -> Iterator[tuple[Any, Any, Any]]:
    """The app as a shared one, with two logins; (ann's client, bob's client, services)."""
    from gradio_client import Client

    try:
        with serve_app(tmp_path, tiny_model_dir, auth=USERS, train_fn=held_training(release)) as (url, services):
            services.set_private(False)
            yield (*(Client(url, auth=user, verbose=False) for user in USERS), services)
    finally:
        release.set()


def photos(folder: Path) -> list[Any]:
    from gradio_client import handle_file

    return [handle_file(str(p)) for p in sorted(folder.glob("*.png"))]


def test_a_visitor_has_one_training_at_a_time_within_the_step_cap(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    release = threading.Event()
    form = {**train_form(TOY_MODEL), "images": photos(subject_images)}
    with shared_app(tmp_path, tiny_model_dir, release) as (ann, bob, services):
        ann.predict(**form, api_name="/train")  # runs (one slot)
        with pytest.raises(Exception, match="already have 1 training"):
            ann.predict(**form, api_name="/train")
        with pytest.raises(Exception, match=rf"`Training steps` \(max_train_steps\) must be at most {SHARED_MAX_STEPS}"):
            bob.predict(**{**form, "max_train_steps": SHARED_MAX_STEPS + 1}, api_name="/train")
        bob.predict(**form, api_name="/train")  # another visitor may: queued behind ann's
        assert bob.predict(api_name="/job_status")["state"] == "queued"
        with pytest.raises(Exception, match="already have 1 training"):
            bob.predict(**form, api_name="/train")
        with pytest.raises(Exception, match="already have 1 training"):  # a Resume is a training too
            services.jobs.resume(services.jobs.view("bob").job_id, owner="bob")
        assert [job.state for job in services.jobs.pending("ann") + services.jobs.pending("bob")] == [
            "running", "queued"]


def test_an_over_cap_generation_is_refused_naming_the_fields(tmp_path: Path, tiny_model_dir: Path) -> None:
    big = ["a photo of sks square", "", 7.5, 200, "DDIM", 0, 2048, 2048, 8, 1.0]  # 6400 megapixel-steps
    refusal = r"`Width` × `Height` × `Images` × `Steps` = 2048×2048×8×200 .* at most 200"
    with shared_app(tmp_path, tiny_model_dir, threading.Event()) as (ann, _, _services), pytest.raises(
        Exception, match=refusal
    ):
        ann.predict(TOY_MODEL, *big, api_name="/generate")


def test_a_generation_past_its_time_cap_stops(tmp_path: Path, tiny_model_dir: Path) -> None:
    small = ["a photo of sks square", "", 7.5, 2, "DDIM", 0, 32, 32, 1, 1.0]
    with shared_app(tmp_path, tiny_model_dir, threading.Event()) as (ann, _, services):
        services.jobs.limits.generate_minutes = 1e-9  # past it at the first step
        with pytest.raises(Exception, match="Generation stopped at this shared app's time limit"):
            ann.predict(TOY_MODEL, *small, api_name="/generate")
        services.jobs.limits.generate_minutes = 10
        assert len(ann.predict(TOY_MODEL, *small, api_name="/generate")) == 1


def test_the_controls_answer_while_a_generation_runs(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start, job status and Cancel answer while another visitor's generation holds the GPU: each answer comes
    before the generation ends (it ends only when the test lets it, or after a minute when a control waits)."""
    from space import generate_tab

    drawing, done, events = threading.Event(), threading.Event(), []

    def slow_generate(pipe: Any, request: Any, deadline: float | None = None) -> list[Any]:
        drawing.set()
        done.wait(60)
        events.append("generation ended")
        return []

    monkeypatch.setattr(generate_tab, "generate", slow_generate)
    form = {**train_form(TOY_MODEL), "images": photos(subject_images)}
    with shared_app(tmp_path, tiny_model_dir, threading.Event()) as (ann, bob, services):
        job = bob.submit(TOY_MODEL, "a photo of sks square", "", 7.5, 2, "DDIM", 0, 32, 32, 1, 1.0,
                         api_name="/generate")
        assert drawing.wait(60)
        ann.predict(**form, api_name="/train")
        events.append("started")
        assert ann.predict(api_name="/job_status")["state"] in ("starting", "running")
        events.append("status")
        assert ann.predict(api_name="/cancel") == texts.CANCELLING
        events.append("cancelled")
        done.set()
        job.result()
    assert events == ["started", "status", "cancelled", "generation ended"]


def test_refused_values_name_their_field_without_a_path_or_a_traceback(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    form = {**train_form(TOY_MODEL), "images": photos(subject_images)}
    generate = ["a photo of sks square", "", 7.5, 2, "DDIM", 0, 32, 32, 1, 1.0]
    with shared_app(tmp_path, tiny_model_dir, threading.Event()) as (ann, _, services):
        answers = {}
        for name, call in {
            "`Training steps` must be a number, got 'abc'": lambda: ann.predict(
                **{**form, "max_train_steps": "abc"}, api_name="/train"),
            "`Identifier` (identifier) must be at most 64 characters, got 300": lambda: ann.predict(
                **{**form, "identifier": "x" * 300}, api_name="/train"),
            "`Guidance scale` must be a number, got 'nan'": lambda: ann.predict(
                TOY_MODEL, *generate[:2], "nan", *generate[3:], api_name="/generate"),
        }.items():
            with pytest.raises(Exception) as refused:  # noqa: PT011 - the message is checked below
                call()
            answers[name] = str(refused.value)
        assert ann.predict(False, api_name="/use_checkpoint") == texts.NO_SCORED_RUN  # words, not page updates
        assert services.jobs.snapshot().state == "idle"
    assert {name: answer for name, answer in answers.items() if name not in answer} == {}
    assert not [answer for answer in answers.values() if str(tmp_path) in answer or "/" in answer]
    log = capfd.readouterr()
    assert "Traceback" not in log.err + log.out


def test_a_training_past_its_time_cap_is_cancelled_keeping_what_it_saved(tmp_path: Path) -> None:
    jobs = JobManager(held_training(threading.Event()))
    jobs.limits.set(FairUse(train_minutes=0.001))  # 60 ms
    config = TrainConfig(pretrained_model="m", instance_data=(), instance_prompt="a photo of sks dog",
                         output_dir=str(tmp_path / "run"), max_train_steps=10**6)
    jobs.start(config)
    snap = jobs.wait(60)
    assert (snap.state, snap.message) == ("cancelled", texts.TIME_CAP_REACHED.format(kept="none was saved yet"))


def test_the_flags_set_the_caps(tmp_path: Path) -> None:
    from ui_fixtures import CPU

    from space.layout import Services

    services = Services.create(runs_dir=tmp_path / "runs", hardware=CPU)
    services.set_private(True)
    assert services.jobs.limits == FairUse()  # the machine's own user: no caps
    services.jobs.limits.check_training(10**9, 5)
    services.set_private(True, **fair_use_caps(parse_args(["--max-steps", "10"])))
    with pytest.raises(FairUseError, match="at most 10 "):
        services.jobs.limits.check_training(11, 0)
    services.set_private(False, **fair_use_caps(parse_args(["--max-generate-megapixel-steps", "1"])))
    assert services.jobs.limits == FairUse(3000, 120, 1, 1, 10)
    services.jobs.limits.check_generation(512, 512, 1, 4)
    with pytest.raises(FairUseError, match="allows at most 1 a request"):
        services.jobs.limits.check_generation(512, 512, 1, 5)
    with pytest.raises(SystemExit):
        parse_args(["--max-train-minutes", "0"])
