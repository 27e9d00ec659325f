"""The CLI run in-process, and a stand-in for train() that runs only the engine's input checks.

`python -m trainer` costs seconds of imports per process; `run_cli` calls the same `main(argv)`
in this process instead, so that a test can try many inputs. `checks_only` replaces `trainer.train`
(which the CLI looks up when it runs) with the real `check_inputs` of a run, and raises `Accepted`
where the training would start: inputs the checks let through are seen without training anything.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from unittest import mock

from trainer.__main__ import main
from trainer.config import TrainConfig
from trainer.events import CancelToken
from trainer.loop import Run, check_inputs


class Accepted(Exception):
    """Every input check passed: the training would start now."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__("accepted")
        self.config = config


def _checks_only(config: TrainConfig, on_event=None, cancel=None):
    check_inputs(Run(config, on_event or (lambda event: None), cancel or CancelToken()))
    raise Accepted(config)


@contextlib.contextmanager
def checks_only() -> Iterator[None]:
    """While active, `python -m trainer train` checks its inputs and raises Accepted instead of training."""
    with mock.patch("trainer.train", _checks_only):
        yield


def run_cli(argv: Sequence[str]) -> tuple[int, str]:
    """(exit status, stderr) of `python -m trainer *argv`, run in this process. Any exception other
    than SystemExit (or Accepted) propagates: that is a traceback the user would have seen."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()
