"""Every training the app starts runs in a process of its own (space/job_process.py), behind a FIFO
queue with owners (space/jobs.py, space/job_queue.py): the CLI's JSON events, the child's life and
death, the queue, who may cancel what, and GPU slots on a fake GPU count.

The first tests are units (no child); those marked slow start real children on the tiny model (each
pays ~10 s of imports on this machine).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from space.job_process import REPO_ROOT, child_env, train_command
from space.job_queue import Slot, SlotPool, gpu_slots, start_estimates
from space.jobs import BusyError, JobManager, NotYourJob, Visitor
from trainer.config import TrainConfig, UserError
from trainer.events import (
    CheckpointEvent,
    FileCancelToken,
    PhaseEvent,
    ProgressEvent,
    RunResult,
    SampleEvent,
    StepEvent,
    WarningEvent,
    event_from_json,
    event_to_json,
)
from trainer.run_folder import read_status


# --- the JSON vocabulary and the CLI's side of it ---------------------------------------------
def test_every_event_and_the_result_round_trip_through_json() -> None:
    events = [
        PhaseEvent("loading", "Loading tiny"),
        StepEvent(3, 10, 0.25, 1e-4, None),
        StepEvent(4, 10, 0.5, 1e-4, 2.5),
        ProgressEvent("class-images", 2, 8),
        SampleEvent(4, (Path("/runs/a/samples/step-000004-p0-0.png"), Path("b.png"))),
        CheckpointEvent(4, Path("/runs/a/checkpoints/checkpoint-000004")),
        WarningEvent("careful"),
        RunResult(Path("/runs/a"), "cancelled", 4, 10, Path("/runs/a/checkpoints/c"), None, (Path("s.png"),), ("w",)),
    ]
    for event in events:
        line = event_to_json(event)
        assert "\n" not in line and json.loads(line)["type"] in ("phase", "step", "progress", "sample", "checkpoint",
                                                                  "warning", "result")
        assert event_from_json(line) == event
    assert json.loads(event_to_json(events[4]))["paths"][0] == "/runs/a/samples/step-000004-p0-0.png"
    error = event_from_json('{"type": "error", "message": "no", "exit": 2}')
    assert error == {"type": "error", "message": "no", "exit": 2}
    with pytest.raises(ValueError):
        event_from_json("Loading weights: 100%")


def _cli_json(argv: list[str]) -> tuple[int, list[dict], str]:
    from trainer.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(argv)
    return status, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def test_the_cli_reports_a_refusal_as_a_json_line_too_and_only_from_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["train", "--pretrained-model", str(tmp_path / "none"), "--output-dir", str(tmp_path / "run"),
            "--instance-data", str(tmp_path), "--instance-prompt", "a photo of sks dog", "--max-train-steps", "0",
            "--events", "json"]
    status, lines, err = _cli_json(argv)
    assert status == 2 and err.startswith("error: `max_train_steps`")
    assert lines == [{"type": "error", "message": err.removeprefix("error: ").strip(), "exit": 2}]
    monkeypatch.setenv("RANK", "1")  # another process of an accelerate launch: silent on stdout
    status, lines, err = _cli_json(argv)
    assert status == 2 and lines == [] and err.startswith("error:")


def test_the_cancel_file_and_signals_stop_the_cli_cleanly(tmp_path: Path) -> None:
    from trainer.__main__ import _stop_on_signals

    token = FileCancelToken(tmp_path / "job.cancel")
    assert not token.cancelled
    (tmp_path / "job.cancel").touch()
    assert token.cancelled

    def before(signum: int, frame: object) -> None:
        raise AssertionError(f"{signal.Signals(signum).name} reached the handler from before the CLI's")

    # What was there before comes back, whatever it was: a handler of the program's own, or "ignored"
    # (SIG_IGN), as in a process started in the background by a shell, where Ctrl-C stops the CLI too.
    inherited = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, previous in enumerate((before, signal.SIG_IGN)):
            for signum in inherited:
                signal.signal(signum, previous)
            token = FileCancelToken(tmp_path / f"term-{i}.cancel")
            with redirect_stderr(io.StringIO()) as err, _stop_on_signals(token):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                assert token.cancelled and "Stopping at the next step" in err.getvalue()
            assert {signum: signal.getsignal(signum) for signum in inherited} == dict.fromkeys(inherited, previous)
            token = FileCancelToken(tmp_path / f"int-{i}.cancel")
            with pytest.raises(KeyboardInterrupt), redirect_stderr(io.StringIO()), _stop_on_signals(token):
                os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C asks for a clean stop...
                time.sleep(0.05)
                assert token.cancelled
                os.kill(os.getpid(), signal.SIGINT)  # ...the second stops now
                time.sleep(0.05)
            assert {signum: signal.getsignal(signum) for signum in inherited} == dict.fromkeys(inherited, previous)
    finally:
        for signum, handler in inherited.items():
            signal.signal(signum, handler)


# --- the child's command line, environment and GPU slots -------------------------------------
def test_the_child_is_started_as_a_user_would_start_it(tmp_path: Path) -> None:
    config, cancel = tmp_path / "job.json", tmp_path / "job.cancel"
    assert train_command(config, cancel) == [
        sys.executable, "-m", "trainer", "train", "--config", str(config), "--events", "json",
        "--cancel-file", str(cancel),
    ]
    several = train_command(config, cancel, processes=4, mixed_precision="bf16")
    assert several[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert several[several.index("--num_processes") + 1] == "4" and "--multi_gpu" in several
    assert several[several.index("--mixed_precision") + 1] == "bf16"
    assert several[-9:] == train_command(config, cancel)[1:]  # `-m trainer train ...` as the script

    base = {"PATH": "/bin", "PYTHONPATH": "/elsewhere", "RANK": "3", "CUDA_VISIBLE_DEVICES": "4,5,6", "HOME": "/h"}
    env = child_env(Slot(1, (1, 2)), base)
    assert env["PYTHONPATH"] == f"{REPO_ROOT}{os.pathsep}/elsewhere" and "RANK" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "5,6"  # GPUs 1 and 2 of the three the app was given
    assert child_env(Slot(0), {"PATH": "/bin"}).keys() == {"PATH", "PYTHONPATH", "PYTHONUNBUFFERED"}


def test_gpu_slots_never_put_two_jobs_on_one_gpu() -> None:
    assert gpu_slots(0, "per_gpu") == gpu_slots(0, "all_gpus") == [Slot(0)]  # CPU: one job at a time
    assert gpu_slots(4, "all_gpus") == [Slot(0, (0, 1, 2, 3))] and gpu_slots(4, "all_gpus")[0].processes == 4
    for count, mode in [(1, "per_gpu"), (3, "per_gpu"), (4, "all_gpus"), (2, "all_gpus")]:
        pool = SlotPool(gpu_slots(count, mode))
        taken = [slot for slot in iter(pool.take, None)]
        gpus = [gpu for slot in taken for gpu in slot.gpus]
        assert sorted(gpus) == list(range(count)) and len(set(gpus)) == len(gpus)  # every GPU, each once
        assert pool.take() is None and pool.free == 0
        pool.release(taken[-1])
        assert pool.take() == taken[-1]
    assert [slot.shares_generation_gpu for slot in gpu_slots(3, "per_gpu")] == [True, False, False]
    assert not gpu_slots(0, "per_gpu")[0].shares_generation_gpu  # no GPU: generation shares the cores
    with pytest.raises(ValueError, match="per_gpu"):
        gpu_slots(2, "round_robin")


def test_a_queued_job_knows_when_it_should_start() -> None:
    # One slot, busy for 100 s more; queued jobs of 50 and 20 steps at 2 s a step.
    assert start_estimates([100.0], 0, [50, 20, 5], 2.0) == [100.0, 200.0, 240.0]
    assert start_estimates([None], 0, [50], 2.0) == [None]  # the running job is still loading
    assert start_estimates([100.0], 0, [50, 20], None) == [100.0, None]  # no step measured yet
    assert start_estimates([30.0, 10.0], 1, [10, 10, 10], 1.0) == [0.0, 10.0, 10.0]  # three slots


def fake_train(release: threading.Event):
    def train(config: TrainConfig, on_event, cancel) -> RunResult:
        on_event(PhaseEvent("training"))
        for step in range(1, config.max_train_steps + 1):
            on_event(StepEvent(step, config.max_train_steps, 1.0, 1e-4, 0.5 * (config.max_train_steps - step)))
            release.wait(5)
            if cancel.cancelled:
                return RunResult(Path(config.output_dir), "cancelled", step, config.max_train_steps, None, None)
        return RunResult(Path(config.output_dir), "completed", config.max_train_steps, config.max_train_steps,
                         None, None)

    return train


def test_per_gpu_runs_a_queued_job_on_each_free_gpu_and_owners_act_on_their_own(tmp_path: Path) -> None:
    release = threading.Event()
    jobs = JobManager(fake_train(release), gpu_count=2, gpu_mode="per_gpu")
    configs = [TrainConfig(output_dir=str(tmp_path / name), max_train_steps=4) for name in "abc"]
    first, second, third = (jobs.start(c, owner=o) for c, o in zip(configs, ["ann", "bob", "ann"], strict=True))
    assert (first.gpus, second.gpus) == ((0,), (1,)) and third.state == "queued" and third.queue_position == 1
    assert jobs.queued()[0].starts_in_seconds == pytest.approx(1.5)  # the first slot frees after 3 steps × 0.5 s
    assert not jobs.gpu_lock.acquire(blocking=False)  # the job on GPU 0 holds generation's GPU

    bob, ann = Visitor("bob"), Visitor("ann")
    with pytest.raises(NotYourJob, match="someone else"):
        jobs.cancel(first.job_id, bob)
    with pytest.raises(NotYourJob):
        jobs.cancel(third.job_id, bob)
    assert jobs.view("bob").job_id == second.job_id and jobs.view("ann").job_id == first.job_id
    assert jobs.cancel(third.job_id, ann)  # withdrawn by its owner
    assert jobs.snapshot(third.job_id).state == "withdrawn" and jobs.queued() == []
    assert jobs.cancel(second.job_id, Visitor("carol", admin=True))  # the local user of a private app
    release.set()
    jobs.wait(10)
    assert [jobs.snapshot(i).state for i in (1, 2, 3)] == ["completed", "cancelled", "withdrawn"]
    assert jobs.gpu_lock.acquire(blocking=False)
    jobs.gpu_lock.release()


def test_a_generation_waits_for_the_training_that_holds_the_gpu(tmp_path: Path) -> None:
    from ui_fixtures import CPU

    from space.generate_tab import GenerateDeps, generate_images
    from space.presets import TOY_MODEL, ToyModel
    from trainer.inference import PipelineCache

    deps = GenerateDeps(JobManager(), tmp_path, ToyModel(), CPU, PipelineCache())
    answer: list = []
    deps.jobs.gpu_lock.acquire()  # as a training on the GPU generation uses holds it
    asker = threading.Thread(target=lambda: answer.append(
        generate_images(deps, TOY_MODEL, "a photo of a red circle", "", 5.0, 2, "DDIM", 1, 32, 32, 1, 1.0)))
    asker.start()
    asker.join(3.0)
    assert asker.is_alive() and answer == []  # waiting, not refused
    deps.jobs.gpu_lock.release()  # the training ended
    asker.join(60)
    assert len(answer) == 1 and answer[0][0].size == (32, 32)
    assert deps.jobs.gpu_lock.acquire(blocking=False)  # and the generation gave the GPU back
    deps.jobs.gpu_lock.release()


def test_the_queue_has_a_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("space.jobs.MAX_QUEUED", 1)
    release = threading.Event()
    jobs = JobManager(fake_train(release), gpu_count=0)
    jobs.start(TrainConfig(output_dir=str(tmp_path / "a"), max_train_steps=2))
    jobs.start(TrainConfig(output_dir=str(tmp_path / "b"), max_train_steps=2))
    with pytest.raises(BusyError, match="queue is full"):
        jobs.start(TrainConfig(output_dir=str(tmp_path / "c"), max_train_steps=2))
    release.set()
    assert jobs.wait(10).state == "completed"


# --- real children on the tiny model ----------------------------------------------------------
def _manager(tmp_path: Path) -> tuple[JobManager, list[tuple[int, float, object]]]:
    """A JobManager that trains in child processes, and the events it received, with their job and time."""
    jobs = JobManager(jobs_dir=tmp_path / "runs" / ".jobs", gpu_count=0, cancel_grace=60)
    seen: list[tuple[int, float, object]] = []
    apply = jobs._apply

    def record(job, event) -> None:
        seen.append((job.job_id, time.monotonic(), event))
        apply(job, event)

    jobs._apply = record
    return jobs, seen


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_events_arrive_in_order_and_queued_jobs_run_one_after_the_other(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    from train_helpers import tiny_config

    jobs, seen = _manager(tmp_path)
    first = jobs.start(tiny_config(tiny_model_dir, subject_images, tmp_path / "runs" / "a"), owner="ann")
    assert first.active and first.pid is not None
    second = jobs.start(tiny_config(tiny_model_dir, subject_images, tmp_path / "runs" / "b", max_train_steps=3),
                        owner="bob")
    assert second.state == "queued" and second.queue_position == 1 and jobs.view("bob").queued
    jobs.wait(120)

    done = [jobs.snapshot(i) for i in (1, 2)]
    assert [(s.state, s.step) for s in done] == [("completed", 6), ("completed", 3)], done
    events = [e for job_id, _, e in seen if job_id == 1]
    assert events[0] == PhaseEvent("loading", f"Loading {tiny_model_dir}")
    assert [e.step for e in events if isinstance(e, StepEvent)] == [1, 2, 3, 4, 5, 6]
    phases = [e.phase for e in events if isinstance(e, PhaseEvent)]
    assert phases[-3:] == ["training", "saving", "done"] and phases.index("training") > phases.index("loading")
    assert [s for _, s in done[0].losses] and done[0].run_dir == str(tmp_path / "runs" / "a")
    last_of_first = max(t for job_id, t, _ in seen if job_id == 1)
    assert min(t for job_id, t, _ in seen if job_id == 2) > last_of_first  # FIFO, never together
    assert read_status(tmp_path / "runs" / "b")["status"] == "completed"
    logs = sorted((tmp_path / "runs" / ".jobs").glob("*.log"))
    assert len(logs) == 2 and logs[0].read_text().startswith("$ ")  # the child's stderr, in the app's folder


@pytest.mark.slow
def test_cancel_stops_the_child_cleanly_with_a_checkpoint_and_only_its_owner_may(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    from train_helpers import tiny_config

    jobs, _ = _manager(tmp_path)
    run = tmp_path / "runs" / "a"
    snap = jobs.start(tiny_config(tiny_model_dir, subject_images, run, max_train_steps=400), owner="session-a")
    with pytest.raises(NotYourJob):
        jobs.cancel(snap.job_id, Visitor("session-b"))  # a visitor cannot cancel another visitor's job
    assert jobs.snapshot(snap.job_id).active
    assert jobs.cancel(snap.job_id, Visitor("session-a"))
    done = jobs.wait(120)
    assert done.state == "cancelled" and 0 < done.step < 400 and done.resumable, done
    assert read_status(run)["status"] == "cancelled"
    assert list((run / "checkpoints").glob("checkpoint-*")) and (run / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_child_leaves_the_app_serving_and_its_run_resumes_to_the_end(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    from train_helpers import tiny_config
    from ui_fixtures import CPU

    from space.presets import ToyModel
    from space.train_tab import TrainDeps, resume_training

    jobs, _ = _manager(tmp_path)
    run = tmp_path / "runs" / "a"
    config = tiny_config(tiny_model_dir, subject_images, run, max_train_steps=120, checkpointing_steps=3)
    snap = jobs.start(config, owner="ann")
    _wait_for(lambda: jobs.snapshot().step >= 4 and list((run / "checkpoints").glob("checkpoint-*")))
    os.killpg(snap.pid, signal.SIGKILL)  # the child's whole process group, as kill -9 or the OOM killer would
    died = jobs.wait(60)

    assert died.state == "failed" and died.resumable and 4 <= died.step < 120, died
    assert "killed (SIGKILL)" in died.error and "Resume" in died.error and "```" in died.error
    assert read_status(run)["status"] == "failed" and read_status(run)["step"] == died.step
    deps = TrainDeps(jobs, tmp_path / "runs", ToyModel(), CPU)
    assert "step" in resume_training(deps)  # the Resume button's handler: the status of the new job
    resumed = jobs.wait(180)
    assert resumed.job_id == 2 and resumed.state == "completed" and resumed.step == 120, resumed
    assert resumed.losses[0][0] > 1  # it went on from a checkpoint, not from step 1
    assert read_status(run)["status"] == "completed" and read_status(run)["step"] == 120


@pytest.mark.slow
def test_bad_input_is_refused_by_start_and_leaves_no_folder(
    tmp_path: Path, tiny_model_dir: Path, subject_images: Path
) -> None:
    from train_helpers import tiny_config

    jobs, _ = _manager(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"photo{i}.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="photo0.png"):  # checked in the app, before anything is copied
        jobs.start(tiny_config(tiny_model_dir, broken, tmp_path / "runs" / "broken"))
    unknown = tiny_config(tiny_model_dir, subject_images, tmp_path / "runs" / "unknown",
                          pretrained_model="nobody/no-such-model")
    with pytest.raises(UserError, match="nobody/no-such-model"):  # said by the child, before its first step
        jobs.start(unknown)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".jobs"]  # no run folder, no copies
    assert jobs.snapshot().state == "failed" and not jobs.snapshot().resumable
