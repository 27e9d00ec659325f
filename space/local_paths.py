"""Which folders on this machine a visitor may name: as the base model, the model to generate from,
the run to publish.

On a private app (this machine's loopback, no public link, no login, not a Space) the visitor is the
machine's user, who may name any folder. Served beyond it, a local path must lie inside the bundled
toy model or the visitor's own runs (space.visitors.RunSpace passes their folder; after following
links); any other is refused before anything reads it. A Hub id (`owner/name`) is not a path and passes, unless a folder of that name exists here, which
diffusers would load first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from trainer.config import ConfigError

REFUSED = ("{what}: '{value}' is a path on this server; an app shared beyond this machine loads only its own "
           "runs and the toy model from disk. Give a Hub model id (owner/name) or pick a run from the list.")


class LocalPaths:
    """`confined` is True until app.py finds the app private, so that an app built on import (a Space,
    `gradio app.py`) is confined from its first request."""

    def __init__(self, roots: Sequence[Path], confined: bool = True) -> None:
        self.roots = tuple(Path(root) for root in roots)
        self.confined = confined

    def allows(self, value: str, also: Sequence[Path] = ()) -> bool:
        """False for a local path outside the roots (and `also`) while confined."""
        text = (value or "").strip()
        if not self.confined or not text or not _names_a_path(text):
            return True
        try:
            path = Path(text).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte: not ours
            return False
        return any(path.is_relative_to(Path(root).resolve()) for root in (*self.roots, *also))

    def check(self, value: str, what: str, also: Sequence[Path] = ()) -> str:
        """`value`, or a ConfigError naming `what` when it is a local path the app may not read."""
        if not self.allows(value, also):
            raise ConfigError(REFUSED.format(what=what, value=value.strip()))
        return value


def _names_a_path(text: str) -> bool:
    """A value diffusers or the app would read from disk rather than ask the Hub for."""
    if text.startswith(("/", "\\", ".", "~")) or os.path.isabs(text) or "\\" in text or "\x00" in text:
        return True
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):
        return True
