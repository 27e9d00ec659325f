"""JobManager: one training at a time, in a background thread the browser cannot kill.

The event handler that starts a training returns at once; the training belongs to this service,
so closing the tab does not stop it, and any page polls `snapshot()` to show its state. The same
`gpu_lock` is held by the training thread and by generation, so they never share the GPU.

A job may also publish its run to the Hub once the training completes (not when cancelled). The
token for that stays in the job's memory until then: never in the config, events, logs or snapshot.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trainer.config import TrainConfig, UserError
from trainer.data import is_caption_file
from trainer.events import (
    CancelToken,
    CheckpointEvent,
    Event,
    EventHandler,
    PhaseEvent,
    ProgressEvent,
    RunResult,
    SampleEvent,
    StepEvent,
    WarningEvent,
)
from trainer.run_folder import instance_images_dir

if TYPE_CHECKING:
    from trainer.hub import PublishResult

log = logging.getLogger(__name__)

JobState = Literal["idle", "starting", "running", "completed", "cancelled", "failed"]
TrainFn = Callable[[TrainConfig, EventHandler, CancelToken], RunResult]


def error_message(err: BaseException) -> str:
    """The engine's own words for input errors; the exception type too for anything else."""
    return str(err) if isinstance(err, UserError | ValueError) else f"{type(err).__name__}: {err}"


class BusyError(RuntimeError):
    """A training is already running."""


@dataclass(frozen=True)
class PublishRequest:
    """Publish the run to `repo_id` once its training completes; the token is kept out of repr."""

    repo_id: str
    private: bool = True
    token: str | None = field(default=None, repr=False)


PublishFn = Callable[[Path, PublishRequest], "PublishResult"]


@dataclass(frozen=True)
class JobSnapshot:
    """Everything a page needs to draw a job; `version` changes whenever anything else does."""

    job_id: int = 0
    version: int = 0
    state: JobState = "idle"
    phase: str = ""
    message: str = ""
    step: int = 0
    total: int = 0
    eta_seconds: float | None = None
    losses: tuple[tuple[int, float], ...] = ()
    samples: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    run_dir: str | None = None
    error: str | None = None
    hub_url: str | None = None  # where the run was published when training finished
    publish_error: str | None = None  # why that failed; the run itself is fine

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")

    @property
    def publishing(self) -> bool:
        return self.active and self.phase == "publishing"

    def as_dict(self) -> dict[str, Any]:
        """Plain data for API clients."""
        return {
            "state": self.state,
            "phase": self.phase,
            "step": self.step,
            "total": self.total,
            "eta_seconds": self.eta_seconds,
            "run_dir": self.run_dir,
            "error": self.error,
            "message": self.message,
            "hub_url": self.hub_url,
            "publish_error": self.publish_error,
            "warnings": list(self.warnings),
            "samples": list(self.samples),
            "losses": [list(point) for point in self.losses],
        }


def default_train(config: TrainConfig, on_event: EventHandler, cancel: CancelToken) -> RunResult:
    from trainer import train  # the engine is imported when the first job starts, not at import

    return train(config, on_event=on_event, cancel=cancel)


def default_publish(run_dir: Path, request: PublishRequest) -> PublishResult:
    from trainer.hub import publish

    return publish(run_dir, request.repo_id, private=request.private, token=request.token)


@dataclass
class _Job:
    snapshot: JobSnapshot
    cancel: CancelToken = field(default_factory=CancelToken)
    first_signal: threading.Event = field(default_factory=threading.Event)
    exception: BaseException | None = None
    publish: PublishRequest | None = None  # dropped once used: the token lives no longer than needed


class JobManager:
    def __init__(
        self,
        train_fn: TrainFn = default_train,
        gpu_lock: threading.Lock | None = None,
        publish_fn: PublishFn = default_publish,
    ) -> None:
        self._train_fn = train_fn
        self._publish_fn = publish_fn
        self.gpu_lock = gpu_lock or threading.Lock()
        self._lock = threading.Lock()  # guards _job and its snapshot
        self._job: _Job | None = None
        self._next_id = 1
        self._finished = threading.Condition(self._lock)

    # --- reading -------------------------------------------------------------------------
    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return self._job.snapshot if self._job else JobSnapshot()

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        """Block until the current job is no longer active (tests, the API)."""
        with self._finished:
            self._finished.wait_for(lambda: not (self._job and self._job.snapshot.active), timeout)
            return self._job.snapshot if self._job else JobSnapshot()

    # --- control -------------------------------------------------------------------------
    def start(
        self, config: TrainConfig, preflight_timeout: float = 60.0, publish: PublishRequest | None = None
    ) -> JobSnapshot:
        """Start `config` in the background; raise BusyError if a job runs.

        Waits (up to `preflight_timeout` seconds) until the engine is past checking inputs and
        loading the model, so that the errors it raises there (bad images, bad config, an unknown
        model) reach the caller as exceptions with the engine's words. With `publish`, a completed
        training is then published (the caller has checked the token already).
        """
        with self._lock:
            if self._job and self._job.snapshot.active:
                snap = self._job.snapshot
                if snap.publishing:
                    raise BusyError("The last training is being published to the Hub; start again in a moment.")
                raise BusyError(f"A training is already running (step {snap.step}/{snap.total}).")
            config = keep_uploads(config)
            job = _Job(
                JobSnapshot(
                    job_id=self._next_id,
                    state="starting",
                    phase="starting",
                    message="Starting…",
                    total=config.max_train_steps,
                    run_dir=config.output_dir,
                ),
                publish=publish,
            )
            self._next_id += 1
            self._job = job
        threading.Thread(target=self._run, args=(job, config), name=f"train-{job.snapshot.job_id}", daemon=True).start()
        job.first_signal.wait(preflight_timeout)
        if job.exception is not None:
            raise job.exception
        return self.snapshot()

    def cancel(self) -> bool:
        """Ask the running job to stop at its next step (it keeps a usable checkpoint)."""
        with self._lock:
            if not (self._job and self._job.snapshot.active) or self._job.snapshot.publishing:
                return False  # an upload under way is not interrupted: the training is done
            self._job.cancel.cancel()
        self._update(self._job, message="Cancelling at the next step…")
        return True

    # --- the background thread -----------------------------------------------------------
    def _run(self, job: _Job, config: TrainConfig) -> None:
        try:
            result = self._train(job, config)
            if result is not None and job.publish is not None and not result.cancelled:
                self._publish(job, result.run_dir, job.publish)
        finally:
            job.publish = None
            with self._finished:
                self._finished.notify_all()

    def _train(self, job: _Job, config: TrainConfig) -> RunResult | None:
        """Train holding the GPU; the result, or None when it failed (the snapshot says why)."""

        def on_event(event: Event) -> None:
            self._apply(job, event)
            # Loading can still fail on user input (fp16 on a CPU, a wrong model id): keep start() waiting.
            if not isinstance(event, WarningEvent) and getattr(event, "phase", None) != "loading":
                job.first_signal.set()

        if not self.gpu_lock.acquire(blocking=False):
            self._update(job, message="Waiting for a generation to finish with the GPU…")
            self.gpu_lock.acquire()
        try:
            self._update(job, state="running")
            result = self._train_fn(config, on_event, job.cancel)
        except Exception as err:  # reported to the UI; a traceback goes to the server log only
            if isinstance(err, UserError | ValueError):  # the engine refused the input: no traceback needed
                log.warning("Training %s refused: %s", job.snapshot.job_id, err)
            else:
                log.exception("Training %s failed", job.snapshot.job_id)
            job.exception = err
            self._update(job, state="failed", error=error_message(err), message="")
            return None
        else:
            publishing = job.publish is not None and not result.cancelled
            self._update(
                job,
                # Still active while it publishes: a second training waits, and wait() covers both.
                state="running" if publishing else result.status,
                phase="publishing" if publishing else "done",
                step=result.step,
                total=result.total_steps,
                run_dir=str(result.run_dir),
                eta_seconds=0.0,
                message=f"Trained; publishing to {job.publish.repo_id}…" if publishing else _finished_message(result),
                samples=tuple(dict.fromkeys((*job.snapshot.samples, *map(str, result.samples)))),
                warnings=tuple(dict.fromkeys((*job.snapshot.warnings, *result.warnings))),
            )
            return result
        finally:
            self.gpu_lock.release()  # publishing needs the network, not the GPU
            job.first_signal.set()

    def _publish(self, job: _Job, run_dir: Path, request: PublishRequest) -> None:
        """Publish the finished run; a failure is reported and the run stays as it is."""
        try:
            result = self._publish_fn(run_dir, request)
        except Exception as err:  # the run is fine: report, keep the job completed
            text = _scrub(error_message(err), request.token)
            if isinstance(err, UserError):  # HubError: a message meant for the user, already scrubbed
                log.warning("Publishing run %s failed: %s", job.snapshot.job_id, text)
            else:
                trace = "".join(traceback.format_exception(err))
                log.error("Publishing run %s failed:\n%s", job.snapshot.job_id, _scrub(trace, request.token))
            self._update(
                job,
                state="completed",
                phase="done",
                publish_error=text,
                message="Done, but publishing failed. The run is complete: publish it from the Publish tab.",
            )
        else:
            visibility = "private" if request.private else "public"
            self._update(
                job,
                state="completed",
                phase="done",
                hub_url=result.url,
                message=f"Done. Published to [{result.repo_id}]({result.url}) ({visibility}).",
            )

    def _apply(self, job: _Job, event: Event) -> None:
        snap = job.snapshot
        if isinstance(event, PhaseEvent):
            self._update(job, phase=event.phase, message=event.message or event.phase.capitalize())
        elif isinstance(event, StepEvent):
            self._update(
                job,
                phase="training",
                step=event.step,
                total=event.total,
                eta_seconds=event.eta_seconds,
                losses=(*snap.losses, (event.step, event.loss)),
            )
        elif isinstance(event, ProgressEvent):
            self._update(job, phase=event.phase, message=f"{event.phase}: {event.done}/{event.total}")
        elif isinstance(event, SampleEvent):
            self._update(job, samples=(*snap.samples, *map(str, event.paths)))
        elif isinstance(event, CheckpointEvent):
            self._update(job, message=f"Checkpoint saved at step {event.step}.")
        elif isinstance(event, WarningEvent):
            self._update(job, warnings=(*snap.warnings, event.message))

    def _update(self, job: _Job, **changes: object) -> None:
        with self._lock:
            job.snapshot = dataclasses.replace(job.snapshot, version=job.snapshot.version + 1, **changes)


def keep_uploads(config: TrainConfig) -> TrainConfig:
    """Copy the uploaded photos (and caption files) into the run folder: gradio deletes its
    temporary uploads, and a run must stay repeatable and resumable from its own config.json.

    Gradio keeps each upload in a folder of its own, so a caption is paired with its photo by
    name here: dog1.txt goes beside dog1.jpg as 03-dog1.txt next to 03-dog1.jpg.
    """
    dest = instance_images_dir(Path(config.output_dir))
    sources = [Path(p) for p in config.instance_data]
    if not all(p.is_file() for p in sources) or all(p.parent == dest for p in sources):
        return config
    ext = config.caption_extension
    photos = [p for p in sources if not is_caption_file(p, ext)]
    captions = {p.stem: p for p in sources if is_caption_file(p, ext)}
    dest.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, src in enumerate(photos):
        target = dest / f"{i:02d}-{src.name}"
        shutil.copy2(src, target)
        copies.append(str(target))
        caption = captions.pop(src.stem, None)
        if caption is not None:
            shutil.copy2(caption, target.with_suffix(ext))
    # A caption matching no photo stays named, so the engine reports it by its own name.
    return config.replace(instance_data=tuple(copies) + tuple(str(p) for p in captions.values()))


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "hf_***") if token else text


def _finished_message(result: RunResult) -> str:
    if not result.cancelled:
        return "Done."
    if result.checkpoint is None:
        return "Cancelled before training started; generated class images stay cached for the next run."
    return "Cancelled: the last checkpoint is kept."
