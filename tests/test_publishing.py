"""space/publishing.py: a job publishes its run once the training completes, never the token."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from ui_fixtures import SECRET, fake_train

from space.jobs import JobManager
from space.publishing import PublishRequest
from trainer.config import TrainConfig
from trainer.publish.hub import HubError


class FakePublish:
    """A publish() stand-in: records its calls, waits for `release`, then succeeds or raises `fail`."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[Path, PublishRequest]] = []
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail

    def __call__(self, run_dir: Path, request: PublishRequest) -> SimpleNamespace:
        self.calls.append((run_dir, request))
        self.entered.set()
        self.release.wait(5)
        if self.fail is not None:
            raise self.fail
        return SimpleNamespace(repo_id=request.repo_id, url=f"https://hub.test/{request.repo_id}", commit="abc1234")


def test_job_manager_publishes_a_completed_training(tmp_path: Path) -> None:
    release, publish = threading.Event(), FakePublish()
    release.set()
    jobs = JobManager(fake_train(release), publish_fn=publish)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=3, instance_prompt="sks")
    jobs.start(config, publish=PublishRequest("tester/sks-dog", private=True, token=SECRET))

    assert publish.entered.wait(10)
    during = jobs.snapshot()
    assert during.active and during.publishing and during.phase == "publishing" and during.step == 3
    assert "publishing to tester/sks-dog" in during.message
    assert not jobs.cancel()  # an upload under way is not interrupted
    assert jobs.gpu_lock.acquire(blocking=False)  # generation may use the GPU meanwhile
    jobs.gpu_lock.release()
    nxt = jobs.start(config.replace(output_dir=str(tmp_path / "next")))  # so may the next training: not queued
    assert nxt.state != "queued" and nxt.queue_position is None
    publish.release.set()
    jobs.wait(10)
    done = jobs.snapshot(1)

    assert done.state == "completed" and done.phase == "done" and done.publish_error is None
    assert done.hub_url == "https://hub.test/tester/sks-dog"
    assert "Published to [tester/sks-dog](https://hub.test/tester/sks-dog) (private)" in done.message
    (run_dir, request), = publish.calls
    assert run_dir == tmp_path / "run" and request.token == SECRET and request.private
    assert SECRET not in repr(request) + repr(done) + repr(done.as_dict()) + repr(jobs._jobs)
    assert jobs._jobs[1].publish is None  # the token is dropped once used


@pytest.mark.parametrize("fail", [HubError("Cannot create x: 403 Forbidden."), RuntimeError(f"boom {SECRET}")])
def test_a_failed_publish_leaves_a_completed_run(
    tmp_path: Path, fail: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    release, publish = threading.Event(), FakePublish(fail)
    release.set()
    publish.release.set()
    jobs = JobManager(fake_train(release), publish_fn=publish)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, instance_prompt="sks")
    jobs.start(config, publish=PublishRequest("tester/sks-dog", token=SECRET))
    done = jobs.wait(10)

    assert done.state == "completed" and done.run_dir == str(tmp_path / "run") and done.hub_url is None
    assert done.publish_error in ("Cannot create x: 403 Forbidden.", "RuntimeError: boom hf_***")
    assert "publish it from the Publish tab" in done.message
    assert SECRET not in caplog.text + repr(done) and "Publishing run 1 failed" in caplog.text


def test_a_cancelled_training_is_not_published(tmp_path: Path) -> None:
    release, publish = threading.Event(), FakePublish()
    jobs = JobManager(fake_train(release), publish_fn=publish)
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=50, instance_prompt="sks")
    jobs.start(config, publish=PublishRequest("tester/sks-dog", token=SECRET))
    assert jobs.cancel()
    release.set()
    done = jobs.wait(10)
    assert done.state == "cancelled" and publish.calls == [] and done.hub_url is None
