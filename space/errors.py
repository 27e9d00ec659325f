"""How the app words an exception for the page: the engine's own words for what the user can fix."""

from __future__ import annotations

from space.job_process import ChildDied
from trainer.config import UserError


def error_message(err: BaseException) -> str:
    """The engine's own words for input errors; the exception type too for anything else."""
    return str(err) if isinstance(err, UserError | ValueError | ChildDied) else f"{type(err).__name__}: {err}"
