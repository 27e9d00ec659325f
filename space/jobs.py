"""JobManager: the app's trainings, each in a process of its own, one queue, first in first out.

The event handler that starts a training returns at once; the training belongs to this service,
so closing the tab does not stop it, and any page polls `snapshot()` / `view()` to show its state
(its loss, samples and, when scored, the checkpoints' scores and pick: space/run_scores.py).
Each training runs as `python -m trainer train --events json` (space/job_process.py), so whatever it
does (out of memory, a crash, kill -9) the app keeps serving, and the GPU's memory is whole again
when it ends. A Start while every GPU slot is busy is queued (space/job_queue.py); queued jobs start
by themselves, and their pages show the position and an estimate of when. The `gpu_lock` is held
while a training runs on the GPU that generation uses, so the two never share it (a generation
asked for meanwhile waits for it, showing the training's step); without a GPU they share the cores.

Each job has an owner (space.visitors: the login, else the browser): a visitor sees, cancels, withdraws,
resumes or deletes only their own, and of the others' only how many there are; `private` (the app runs
on this machine for its one user, set by app.py) lets the local user see and act on any. On a shared app
a completed training's photos are deleted unless its owner asked to keep them. A job may also publish its run to the Hub once the training
completes (not when cancelled): space/publishing.py does that, here in the app's process. The token
for that stays in the job's memory until then: never in the child's argv, environment, config,
events, logs or the snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from space import texts
from space.errors import error_message
from space.fair_use import FairUse
from space.job_process import JOBS_DIR, ChildDied, JobFiles, TrainingProcess
from space.job_queue import GpuMode, Slot, SlotPool, gpu_slots, start_estimates
from space.job_runs import (
    check_inputs,
    delete_run_folder,
    discard_uploads,
    has_checkpoint,
    keep_uploads,
    mark_run,
    remove_photos,
)
from space.job_snapshot import JobSnapshot
from space.publishing import PublishFn, PublishRequest, default_publish, publish_run
from space.run_scores import RunScores, run_scores
from trainer.config import ConfigError, TrainConfig, UserError
from trainer.events import (
    CancelToken,
    CheckpointEvent,
    Event,
    EventHandler,
    PhaseEvent,
    ProgressEvent,
    RunResult,
    SampleEvent,
    ScoreEvent,
    StepEvent,
    WarningEvent,
)
from trainer.run_folder import is_run, read_config

log = logging.getLogger(__name__)
__all__ = ["BusyError", "JobManager", "NotYourJob", "TrainFn", "Visitor"]

TrainFn = Callable[[TrainConfig, EventHandler, CancelToken], RunResult]
CANCEL_GRACE_SECONDS = 120.0  # after Cancel, a training that has not stopped by then is killed
MAX_QUEUED = 20
KEEP_FINISHED = 50  # finished jobs remembered (their pages, their Resume button)


class BusyError(RuntimeError):
    """The queue is full."""


class NotYourJob(UserError):
    """A visitor asked to cancel or resume someone else's training."""


@dataclass(frozen=True)
class Visitor:
    """Who asks: the Hub user, else the browser session; `admin` may act on any job (the local user
    of an app that runs privately on this machine)."""

    id: str | None
    admin: bool = False


@dataclass
class _Job:
    snapshot: JobSnapshot
    config: TrainConfig
    owner: str | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    first_signal: threading.Event = field(default_factory=threading.Event)
    exception: BaseException | None = None
    publish: PublishRequest | None = None  # dropped once used: the token lives no longer than needed
    created_dir: bool = False  # the app made output_dir: a refused run's copies are removed again
    slot: Slot | None = None  # held from its start to the end of its training (not while it publishes)
    process: TrainingProcess | None = None
    timed_out: bool = False  # cancelled by the app at the shared app's time cap
    keep_photos: bool = True  # False: the copies of the photos go once the training completes
    phase_began: dict[str, float] = field(default_factory=dict)  # when each progress phase began: its ETA

    @property
    def job_id(self) -> int:
        return self.snapshot.job_id


class JobManager:
    """The app's trainings. `train_fn` runs them in this process instead (fast UI tests); by default
    each runs in a child process. `gpu_count` (None: as torch sees them) and `gpu_mode` say how the
    queue uses several GPUs; `cancel_grace` is how long a cancelled training may take to stop before
    it is killed; `jobs_dir` holds the jobs' configs and logs (default: `.jobs` beside the run folder)."""

    def __init__(
        self,
        train_fn: TrainFn | None = None,
        gpu_lock: threading.Lock | None = None,
        publish_fn: PublishFn = default_publish,
        *,
        jobs_dir: Path | None = None,
        gpu_count: int | None = None,
        gpu_mode: GpuMode = "per_gpu",
        cancel_grace: float = CANCEL_GRACE_SECONDS,
        private: bool = False,
    ) -> None:
        self._train_fn = train_fn
        self._publish_fn = publish_fn
        self.gpu_lock = gpu_lock or threading.Lock()
        self.jobs_dir = jobs_dir
        self.cancel_grace = cancel_grace
        self.private = private  # the app runs privately on this machine: its user may cancel any job
        self.limits = FairUse()  # a shared app's caps (space.fair_use), set by Services.set_private
        self.weights_lock = threading.Lock()  # a run's weights: rewritten by "Use checkpoint", read by a load
        self._slots = SlotPool(gpu_slots(_gpu_count() if gpu_count is None else gpu_count, gpu_mode))
        self._lock = threading.Lock()  # guards the jobs, the queue, the slots and every snapshot
        self._jobs: dict[int, _Job] = {}
        self._queue: list[_Job] = []
        self._next_id = 1
        self._seconds_per_step: float | None = None  # last measured, for the queue's estimates
        self._finished = threading.Condition(self._lock)

    # --- reading -------------------------------------------------------------------------
    def snapshot(self, job_id: int | None = None) -> JobSnapshot:
        """A job by id; without one, the current job: the oldest running, else the newest started, else idle."""
        with self._lock:
            job = self._jobs.get(job_id) if job_id is not None else self._current()
            return job.snapshot if job else JobSnapshot()

    def view(self, owner: str | None) -> JobSnapshot:
        """What `owner`'s page shows: their running job, else their next queued one, else their newest
        (not withdrawn); else, on a private app or for the app itself (`owner` None), the current job."""
        with self._lock:
            mine = [job for job in self._jobs.values() if owner is not None and job.owner == owner]
            running = [job for job in mine if job.snapshot.active]
            queued = [job for job in mine if job.snapshot.queued]
            ended = [job for job in mine if not job.snapshot.pending and job.snapshot.state != "withdrawn"]
            job = (running or queued or [None])[0] or (ended[-1] if ended else None)
            job = job or (self._current() if self.private or owner is None else None)  # None: the app itself
            return job.snapshot if job else JobSnapshot()

    def others(self, owner: str | None) -> tuple[int, int]:
        """How many trainings of other visitors run and wait: all a visitor learns of them."""
        with self._lock:
            theirs = [job for job in self._jobs.values() if owner is None or job.owner != owner]
            return sum(job.snapshot.active for job in theirs), sum(job.snapshot.queued for job in theirs)

    def busy_runs(self) -> set[Path]:
        """The run folders of queued and running jobs (never deleted under them)."""
        with self._lock:
            return {Path(job.config.output_dir).resolve() for job in self._jobs.values() if job.snapshot.pending}

    def pending(self, owner: str | None) -> list[JobSnapshot]:
        """`owner`'s running and queued jobs, oldest first."""
        with self._lock:
            return [job.snapshot for job in self._jobs.values() if job.owner == owner and job.snapshot.pending]

    def queued(self) -> list[JobSnapshot]:
        with self._lock:
            return [job.snapshot for job in self._queue]

    def owns(self, job_id: int, visitor: Visitor | None) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            return job is not None and self._may_act(job, visitor)

    def wait(self, timeout: float | None = None, job_id: int | None = None) -> JobSnapshot:
        """Block until `job_id` (default: every job, queued ones too) has finished (tests, the API)."""

        def done() -> bool:
            if job_id is not None:
                return not self._jobs[job_id].snapshot.pending
            return not any(job.snapshot.pending for job in self._jobs.values())

        with self._finished:
            self._finished.wait_for(done, timeout)
        return self.snapshot(job_id)

    # --- control -------------------------------------------------------------------------
    def start(
        self,
        config: TrainConfig,
        preflight_timeout: float = 60.0,
        publish: PublishRequest | None = None,
        owner: str | None = None,
        keep_photos: bool = True,
    ) -> JobSnapshot:
        """Queue `config`; it starts at once when a GPU slot is free. Raises the engine's error for
        input it refuses (checked here first; then, for a job that starts now, what the child says
        before its first step, waiting up to `preflight_timeout` seconds). With `publish`, a completed
        training is then published (the caller has checked the token already). Without `keep_photos` the
        run's copies of the photos are deleted once the training completes."""
        if self._train_fn is None:  # an in-process train_fn checks its own inputs, as the engine's train() does
            check_inputs(config)
        out = Path(config.output_dir)
        with self._lock:
            mine = sum(job.snapshot.pending for job in self._jobs.values() if owner is not None and job.owner == owner)
            self.limits.check_training(config.max_train_steps, mine)
            if len(self._queue) >= MAX_QUEUED:
                raise BusyError(texts.QUEUE_FULL.format(n=len(self._queue)))
            if any(job.snapshot.pending and Path(job.config.output_dir) == out for job in self._jobs.values()):
                raise ConfigError(texts.SAME_FOLDER_QUEUED.format(folder=out), field="output_dir")
        created = not out.exists()
        config = keep_uploads(config)  # only now: a refused run leaves nothing behind
        earlier = run_scores(out)  # a resumed run's scores so far
        with self._lock:
            job = _Job(
                JobSnapshot(job_id=self._next_id, state="queued", phase="queued", total=config.max_train_steps,
                            run_dir=config.output_dir, scores=earlier),
                config=config, owner=owner, publish=publish, created_dir=created, keep_photos=keep_photos,
            )
            self._next_id += 1
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._forget_old()
            self._dispatch()
            started = job.slot is not None
        if started:
            job.first_signal.wait(preflight_timeout)
            if job.exception is not None:
                raise job.exception
        return self.snapshot(job.job_id)

    def resume(self, job_or_run_dir: int | str | Path, owner: str | None = None,
               visitor: Visitor | None = None) -> JobSnapshot:
        """Queue a failed or cancelled run again, from its last checkpoint: a job id (its owner, or
        an admin) or a run folder. The run's own config.json is used where the child wrote one."""
        keep_photos = True
        if isinstance(job_or_run_dir, int):
            with self._lock:
                job = self._jobs.get(job_or_run_dir)
                if job is None:
                    raise ConfigError(texts.NOTHING_TO_RESUME)
                if not self._may_act(job, visitor):
                    raise NotYourJob(texts.NOT_YOUR_JOB)
                config, keep_photos = job.config, job.keep_photos
        else:
            config = read_config(Path(job_or_run_dir))
        if is_run(Path(config.output_dir)):
            config = read_config(Path(config.output_dir))
        return self.start(config.replace(resume_from_checkpoint="latest"), owner=owner, keep_photos=keep_photos)

    def delete_run(self, job_id: int, visitor: Visitor | None = None) -> Path:
        """Delete a finished job's run folder (photos, weights, samples, checkpoints): its owner's, or an admin's.
        Refused (UserError) while it is queued or training."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or not Path(job.config.output_dir).exists():
                raise ConfigError(texts.NOTHING_TO_DELETE)
            if not self._may_act(job, visitor):
                raise NotYourJob(texts.NOT_YOUR_JOB)
            if job.snapshot.pending:
                raise ConfigError(texts.CANCEL_BEFORE_DELETE)
            run_dir = Path(job.config.output_dir)
            self._set(job, message=texts.RUN_DELETED, resumable=False, samples=(), error=None, warnings=(),
                      run_dir=None, scores=RunScores())
        delete_run_folder(run_dir)
        return run_dir

    def cancel(self, job_id: int | None = None, visitor: Visitor | None = None) -> bool:
        """Stop a running job at its next step (it keeps a usable checkpoint), or withdraw a queued one.
        Without `job_id`, the current running job. `visitor` None is the app itself; a visitor may
        stop only their own jobs (NotYourJob), unless an admin."""
        with self._lock:
            job = self._jobs.get(job_id) if job_id is not None else self._current()
            if job is None or not (job.snapshot.queued or job.snapshot.active) or job.snapshot.publishing:
                return False  # an upload under way is not interrupted: the training is done
            if not self._may_act(job, visitor):
                raise NotYourJob(texts.NOT_YOUR_JOB)
            if job.snapshot.queued:
                self._queue.remove(job)
                self._set(job, state="withdrawn", phase="withdrawn", message=texts.WITHDRAWN, queue_position=None,
                          starts_in_seconds=None)
                self._estimate()
                self._finished.notify_all()
                withdrawn = True
            else:
                job.cancel.cancel()
                self._set(job, message=texts.CANCELLING)
                withdrawn = False
        if withdrawn:
            discard_uploads(job.config, job.created_dir)
        elif job.process is not None:
            job.process.stop()
        return True

    def cancel_all(self) -> None:
        """Withdraw every queued job and cancel every running one (shutting down, tests)."""
        with self._lock:
            ids = [job.job_id for job in (*self._queue, *self._jobs.values())]
        for job_id in dict.fromkeys(ids):
            self.cancel(job_id)

    # --- the queue -----------------------------------------------------------------------
    def _current(self) -> _Job | None:
        """The oldest running job; else the newest that started; else the newest of any (under the lock)."""
        jobs = list(self._jobs.values())
        running = [job for job in jobs if job.snapshot.active]
        if running:
            return running[0]
        started = [job for job in jobs if not job.snapshot.queued and job.snapshot.state != "withdrawn"]
        return (started or jobs or [None])[-1]

    def _may_act(self, job: _Job, visitor: Visitor | None) -> bool:
        return visitor is None or visitor.admin or self.private or (visitor.id is not None and visitor.id == job.owner)

    def _dispatch(self) -> None:
        """Start queued jobs, first in first out, while a slot is free (under the lock)."""
        while self._queue and (slot := self._slots.take()) is not None:
            job = self._queue.pop(0)
            job.slot = slot
            if self._train_fn is None:
                folder = self.jobs_dir or Path(job.config.output_dir).parent / JOBS_DIR
                name = f"{time.strftime('%Y%m%d-%H%M%S')}-job{job.job_id}"
                job.process = TrainingProcess(JobFiles.make(folder, name), slot, self.cancel_grace)
            self._set(job, state="starting", phase="starting", message="Starting…", queue_position=None,
                      starts_in_seconds=None, gpus=slot.gpus,
                      log_path=str(job.process.files.log) if job.process else None)
            threading.Thread(target=self._run, args=(job,), name=f"train-{job.job_id}", daemon=True).start()
        self._estimate()

    def _estimate(self) -> None:
        """Each queued job's position and estimated start (under the lock)."""
        holding = [job for job in self._jobs.values() if job.slot is not None]
        etas = [job.snapshot.eta_seconds if job.snapshot.phase == "training" else None for job in holding]
        steps = [job.config.max_train_steps for job in self._queue]
        for position, (job, start) in enumerate(
            zip(self._queue, start_estimates(etas, self._slots.free, steps, self._seconds_per_step), strict=True), 1
        ):
            if (job.snapshot.queue_position, job.snapshot.starts_in_seconds) != (position, start):
                self._set(job, queue_position=position, starts_in_seconds=start)

    def _release_slot(self, job: _Job) -> None:
        with self._lock:
            if job.slot is not None:
                self._slots.release(job.slot)
                job.slot = None
            self._dispatch()

    def _forget_old(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if not job.snapshot.pending]
        for job_id in finished[:-KEEP_FINISHED]:
            del self._jobs[job_id]

    # --- the job's thread ----------------------------------------------------------------
    def _run(self, job: _Job) -> None:
        timer = self._time_cap(job)  # from its start: a wait for a generation's GPU counts (its own cap bounds it)
        try:
            result = self._train(job)
            timer.cancel()
            self._read_scores(job)
            if result is not None and result.status == "completed" and not job.keep_photos:
                remove_photos(Path(job.config.output_dir))
                self._update(job, message=f"{job.snapshot.message} {texts.PHOTOS_DELETED}".strip())
            if result is not None and job.publish is not None and not result.cancelled:
                self._update(job, **publish_run(self._publish_fn, result.run_dir, job.publish, job.job_id))
        finally:
            job.publish = None
            with self._finished:
                self._finished.notify_all()

    def _train(self, job: _Job) -> RunResult | None:
        """Train holding the slot (and the GPU lock, on the GPU generation uses); the result, or None
        when it failed (the snapshot says why)."""

        def on_event(event: Event) -> None:
            self._apply(job, event)
            # Loading can still fail on user input (fp16 on a CPU, a wrong model id): keep start() waiting.
            if not isinstance(event, WarningEvent) and getattr(event, "phase", None) != "loading":
                job.first_signal.set()

        config, lock = job.config, job.slot is not None and job.slot.shares_generation_gpu
        if lock and not self.gpu_lock.acquire(blocking=False):
            self._update(job, message="Waiting for a generation to finish with the GPU…")
            self.gpu_lock.acquire()
        try:
            self._update(job, state="running")
            if job.process is None:
                result = self._train_fn(config, on_event, job.cancel)
            else:  # a cancel while it waited for the GPU left the cancel file: it stops at its first step
                result = job.process.run(config, on_event)
        except ChildDied as err:
            self._died(job, err)
            return None
        except Exception as err:  # reported to the UI; a traceback goes to the server log only
            refused = isinstance(err, UserError | ValueError) and not job.first_signal.is_set()
            if isinstance(err, UserError | ValueError):  # the engine refused the input: no traceback needed
                log.warning("Training %s refused: %s", job.job_id, err)
            else:
                log.exception("Training %s failed", job.job_id)
            job.exception = err
            if refused:
                discard_uploads(job.config, job.created_dir)
            else:
                mark_run(job.config, "failed", job.snapshot.step)
            resumable = not refused and is_run(Path(config.output_dir))
            self._update(job, state="failed", error=error_message(err, not self.private), message="", resumable=resumable)
            return None
        else:
            publishing = job.publish is not None and not result.cancelled
            self._update(
                job,
                # Still active while it publishes: wait() covers both; the next training may start meanwhile.
                state="running" if publishing else result.status,
                phase="publishing" if publishing else "done",
                step=result.step,
                total=result.total_steps,
                run_dir=str(result.run_dir),
                eta_seconds=0.0,
                message=_finished_message(result, job.publish.repo_id if publishing else None, job.timed_out),
                samples=tuple(dict.fromkeys((*job.snapshot.samples, *map(str, result.samples)))),
                warnings=tuple(dict.fromkeys((*job.snapshot.warnings, *result.warnings))),
                resumable=result.cancelled and result.checkpoint is not None,
            )
            return result
        finally:
            if lock:
                self.gpu_lock.release()  # publishing needs the network, not the GPU
            self._update(job, pid=None)
            job.first_signal.set()
            self._release_slot(job)

    def _time_cap(self, job: _Job) -> threading.Timer:
        """A timer that cancels the training (its checkpoint kept) once it has run the shared app's minutes;
        started only where there is such a cap."""
        seconds = self.limits.train_seconds

        def time_up() -> None:
            job.timed_out = True
            log.info("Training %s reached the time cap of %s minutes", job.job_id, self.limits.train_minutes)
            self.cancel(job.job_id)

        timer = threading.Timer(seconds or 0.0, time_up)
        timer.daemon = True
        if seconds is not None:
            timer.start()
        return timer

    def _read_scores(self, job: _Job) -> None:
        """A finished training's scores as its run folder keeps them: the pick among the checkpoints still there."""
        scores = run_scores(Path(job.config.output_dir))
        if scores.rows:
            self._update(job, scores=scores)

    def _died(self, job: _Job, err: ChildDied) -> None:
        """The child ended without a result: killed (by us after a cancel, or by anyone), crashed."""
        stopped = err.forced and job.cancel.cancelled
        log.warning("Training %s %s: exit %s", job.job_id, "stopped by force" if stopped else "died", err.returncode)
        mark_run(job.config, "cancelled" if stopped else "failed", job.snapshot.step)
        run_dir = Path(job.config.output_dir)
        if stopped:
            message = texts.STOPPED_BY_FORCE.format(seconds=self.cancel_grace)
            self._update(job, state="cancelled", message=message, resumable=has_checkpoint(run_dir))
        else:
            self._update(job, state="failed", error=error_message(err, not self.private), message="", resumable=True)

    def _apply(self, job: _Job, event: Event) -> None:
        snap = job.snapshot
        if job.process is not None and snap.pid is None and job.process.pid is not None:
            self._update(job, pid=job.process.pid)
        if isinstance(event, PhaseEvent):
            job.phase_began.setdefault(event.phase, time.monotonic())
            self._update(job, phase=event.phase, message=event.message or event.phase.capitalize())
        elif isinstance(event, StepEvent):
            if event.eta_seconds is not None and event.total > event.step:
                self._seconds_per_step = event.eta_seconds / (event.total - event.step)
            self._update(
                job,
                phase="training",
                step=event.step,
                total=event.total,
                eta_seconds=event.eta_seconds,
                losses=(*snap.losses, (event.step, event.loss)),
            )
            with self._lock:
                self._estimate()
        elif isinstance(event, ProgressEvent):
            began = job.phase_began.setdefault(event.phase, time.monotonic())
            left = (time.monotonic() - began) / event.done * (event.total - event.done) if event.done else None
            more = f" · about {texts.eta_text(left)} left" if left is not None and event.done < event.total else ""
            self._update(job, phase=event.phase, message=f"{event.phase}: {event.done}/{event.total}{more}")
        elif isinstance(event, SampleEvent):
            self._update(job, samples=(*snap.samples, *map(str, event.paths)))
        elif isinstance(event, CheckpointEvent):
            self._update(job, message=f"Checkpoint saved at step {event.step}.")
        elif isinstance(event, WarningEvent):
            self._update(job, warnings=(*snap.warnings, event.message))
        elif isinstance(event, ScoreEvent):
            self._update(job, scores=snap.scores.with_row(event.scores, event.pick, event.pick_reason))

    def _update(self, job: _Job, **changes: object) -> None:
        with self._lock:
            self._set(job, **changes)

    @staticmethod
    def _set(job: _Job, **changes: object) -> None:
        job.snapshot = dataclasses.replace(job.snapshot, version=job.snapshot.version + 1, **changes)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _finished_message(result: RunResult, publishing_to: str | None = None, timed_out: bool = False) -> str:
    if publishing_to is not None:
        return texts.TRAINED_PUBLISHING.format(repo_id=publishing_to)
    if not result.cancelled:
        return "Done."
    if timed_out:
        return texts.TIME_CAP_REACHED.format(kept="kept" if result.checkpoint is not None else "none was saved yet")
    if result.checkpoint is None:
        return "Cancelled before training started; generated class images stay cached for the next run."
    return "Cancelled: the last checkpoint is kept."
