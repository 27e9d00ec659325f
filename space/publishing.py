"""Publishing a run to the Hub once its training completes (not when cancelled): the request a Start
carries, and the step the JobManager (space/jobs.py) runs after the training, in the app's process.

The token stays in this process: in the request (never in its repr) until the step has used it,
and out of every message and log line the step writes, even those of an unexpected failure.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from space import texts
from space.errors import error_message
from trainer.config import UserError
from trainer.publish.hub import PublishResult, publish, scrub_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishRequest:
    """Publish the run to `repo_id` once its training completes; the token is kept out of repr."""

    repo_id: str
    private: bool = True
    token: str | None = field(default=None, repr=False)


PublishFn = Callable[[Path, PublishRequest], PublishResult]


def default_publish(run_dir: Path, request: PublishRequest) -> PublishResult:
    return publish(run_dir, request.repo_id, private=request.private, token=request.token)


def publish_run(publish_fn: PublishFn, run_dir: Path, request: PublishRequest, job_id: int) -> dict[str, object]:
    """Publish job `job_id`'s finished run with `publish_fn`: the changes to its snapshot that say how it
    went. The job is completed either way: a failure is reported and the run stays as it is."""
    try:
        result = publish_fn(run_dir, request)
    except Exception as err:  # the run is fine: report, keep the job completed
        text = scrub_token(error_message(err), request.token)
        if isinstance(err, UserError):  # HubError: a message meant for the user, already scrubbed
            log.warning("Publishing run %s failed: %s", job_id, text)
        else:
            trace = "".join(traceback.format_exception(err))
            log.error("Publishing run %s failed:\n%s", job_id, scrub_token(trace, request.token))
        return {
            "state": "completed",
            "phase": "done",
            "publish_error": text,
            "message": texts.PUBLISH_FAILED_AFTER_TRAINING,
        }
    return {
        "state": "completed",
        "phase": "done",
        "hub_url": result.url,
        "message": texts.published_after_training(result.repo_id, result.url, request.private),
    }
