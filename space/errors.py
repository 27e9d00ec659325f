"""How the app words an exception for the page: the engine's own words for what the user can fix."""

from __future__ import annotations

import re

from space.job_process import ChildDied
from trainer.config import UserError

# An absolute path (not the path of a URL: never after a word character, a dot, ":" or "/"), its folders
# in group 0 and its last part in group 1.
_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"`:,;()\[\]<>]+/)+([^\s/'\"`:,;()\[\]<>]*)")


def error_message(err: BaseException, hide_paths: bool = False) -> str:
    """The engine's own words for input errors; the exception type too for anything else. `hide_paths`
    (a shared app): every absolute path said by its last part ("photo.png", not where it lies here)."""
    text = str(err) if isinstance(err, UserError | ValueError | ChildDied) else f"{type(err).__name__}: {err}"
    return without_paths(text) if hide_paths else text


SHOWN_CHARS = 40  # of a value a message repeats back


def shortened(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` as a message repeats it: at most `limit` characters, then "…"."""
    return text if len(text) <= limit else text[:limit] + "…"


def without_paths(text: str) -> str:
    """`text` with each absolute path on this server shortened to its last part."""
    return _PATH.sub(lambda match: match[1], text)
