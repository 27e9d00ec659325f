"""Small helpers that wire module-level handlers to gradio events.

A tab's handlers are plain functions whose first parameter is the tab's dependencies (tests call
them directly). `bind` fills that parameter in as a bound method would: gradio then sees the
function's own name, docstring, signature and type hints (gr.OAuthToken, gr.Progress) minus the
first parameter, which a functools.partial would hide from it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

# Event options of the helpers that only redraw the page: no API endpoint, no spinner, no queue.
PRIVATE: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden", "queue": False}


def bind(fn: Callable[..., Any], first: object) -> Callable[..., Any]:
    """`fn` with its first argument set to `first`, as a bound method."""
    return types.MethodType(fn, first)


def by_component(fn: Callable[[], Mapping[str, Any]], components: Mapping[str, Any]) -> Callable[[], dict]:
    """Wire a handler that returns its values by key: gradio wants them by component."""

    def handler() -> dict[Any, Any]:
        return {components[key]: value for key, value in fn().items()}

    handler.__name__, handler.__doc__ = fn.__name__, fn.__doc__
    return handler
