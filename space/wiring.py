"""Small helpers that wire module-level handlers to gradio events.

A tab's handlers are plain functions whose first parameter is the tab's dependencies (tests call
them directly). `bind` fills that parameter in as a bound method would: gradio then sees the
function's own name, docstring, signature and type hints (gr.OAuthToken, gr.Progress) minus the
first parameter, which a functools.partial would hide from it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gradio as gr

from space.errors import shortened

# Event options of the helpers that only redraw the page: no API endpoint, no spinner, no queue.
PRIVATE: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden", "queue": False}
# The controls (Start, Cancel, Resume, Use checkpoint, Publish, job status): a queue group of their own and
# no limit, so that none waits behind a generation (the "gpu" group) or another visitor's control.
CONTROL: dict[str, Any] = {"concurrency_id": "control", "concurrency_limit": None}
# The controls that answer at once (Start, Cancel, Resume, Delete): no timer on the status line, where gradio's
# "0.1s" would otherwise stay beside the poll's text.
INSTANT: dict[str, Any] = {**CONTROL, "show_progress": "hidden"}


def bind(fn: Callable[..., Any], first: object) -> Callable[..., Any]:
    """`fn` with its first argument set to `first`, as a bound method."""
    return types.MethodType(fn, first)


def by_component(fn: Callable[[], Mapping[str, Any]], components: Mapping[str, Any]) -> Callable[[], dict]:
    """Wire a handler that returns its values by key: gradio wants them by component."""

    def handler() -> dict[Any, Any]:
        return {components[key]: value for key, value in fn().items()}

    handler.__name__, handler.__doc__ = fn.__name__, fn.__doc__
    return handler


def name_refusals(components: Iterable[Any]) -> None:
    """Make each component's refusal of a value (an API client's steps "abc") a gr.Error that names the field
    by its label, without a traceback in the log, instead of gradio's generic error."""
    for component in components:
        component.preprocess = _named(component.preprocess, component)


def _named(preprocess: Callable[[Any], Any], component: Any) -> Callable[[Any], Any]:
    label = getattr(component, "label", None) or "value"
    number = isinstance(component, gr.Number | gr.Slider)

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception:
            plain = isinstance(payload, int | float | str) and getattr(component, "type", None) != "password"
            shown = repr(payload) if plain else type(payload).__name__
            shown = shortened(shown)
            what = "must be a number" if number else "does not take this value"
            raise gr.Error(f"`{label}` {what}, got {shown}.", print_exception=False) from None

    return checked
