"""space/jobs.py's JobManager with an in-process train() stand-in: one job at a time, the queue, cancel,
the engine's errors (tests/test_jobs_process.py runs real child processes)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ui_fixtures import fake_train

from space.jobs import JobManager
from trainer.config import ConfigError, TrainConfig


def test_job_manager_runs_one_job_at_a_time_and_cancels(tmp_path: Path) -> None:
    release = threading.Event()
    jobs = JobManager(fake_train(release), gpu_count=0)
    config = TrainConfig(output_dir=str(tmp_path / "a"), max_train_steps=50, instance_prompt="sks")
    snap = jobs.start(config)
    assert snap.active and snap.job_id == 1
    queued = jobs.start(config.replace(output_dir=str(tmp_path / "b"), max_train_steps=2))  # queued, not refused
    assert queued.state == "queued" and queued.queue_position == 1 and not queued.active
    with pytest.raises(ConfigError, match="already the folder of a queued or running training"):
        jobs.start(config)
    assert jobs.gpu_lock.acquire(blocking=False)  # no GPU: generation shares the cores with the training
    jobs.gpu_lock.release()
    assert jobs.cancel()
    release.set()
    jobs.wait(10)
    done = jobs.snapshot(1)
    assert done.state == "cancelled" and done.warnings == ("careful",) and [Path(s).name for s in done.samples] == ["step-000001-p0-0.png"]
    assert done.losses[0] == (1, 1.0) and done.step < 50
    assert jobs.snapshot(2).state == "completed"  # the queued job started by itself once the first ended
    assert jobs.gpu_lock.acquire(blocking=False)
    jobs.gpu_lock.release()


def test_job_manager_raises_engine_errors_from_start(tmp_path: Path) -> None:
    jobs = JobManager(fake_train(threading.Event(), fail=ConfigError("`mixed_precision` fp16 needs a CUDA GPU")))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        jobs.start(TrainConfig(output_dir=str(tmp_path)))
    assert jobs.snapshot().state == "failed" and jobs.snapshot().error == "`mixed_precision` fp16 needs a CUDA GPU"
    assert not jobs.snapshot().active  # a failed job does not block the next one


def test_a_phase_with_progress_says_about_how_long_it_has_left(tmp_path: Path) -> None:
    from trainer.events import PhaseEvent, ProgressEvent, RunResult

    seen = []

    def train(config: TrainConfig, on_event, cancel) -> RunResult:
        on_event(PhaseEvent("class-images", "Preparing 4 class images"))
        for done in range(1, 5):
            on_event(ProgressEvent("class-images", done, 4))
            seen.append(jobs.snapshot().message)
        return RunResult(Path(config.output_dir), "completed", 0, 1, None, None)

    jobs = JobManager(train, gpu_count=0)
    jobs.start(TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=1, instance_prompt="sks"))
    jobs.wait(10)
    assert seen[0].startswith("class-images: 1/4 · about ") and seen[0].endswith(" left")
    assert seen[-1] == "class-images: 4/4"  # done: nothing left to estimate
