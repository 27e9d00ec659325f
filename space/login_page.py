"""The login page of an app with `--auth` carries nothing of the app.

gradio answers `/` (and `/gradio_api/runs`) for a visitor who has not logged in with its login page,
whose config is empty, but embeds the whole API description next to it: every endpoint, every
parameter's label and default, the dropdowns' choices (run folders among them). This ASGI middleware
empties that description on a page whose config says a login is required; once logged in, the page
is untouched.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.middleware import Middleware

_LOGIN_CONFIG = re.compile(rb'window\.gradio_config = \{[^<]*"auth_required":\s*true')
_API_INFO = re.compile(rb"(window\.gradio_api_info = ).*?(;</script>)", re.DOTALL)
_EMPTY_API = rb'{"named_endpoints":{},"unnamed_endpoints":{}}'


def scrub(body: bytes) -> bytes:
    """`body` with the API description emptied when it is a login page."""
    if not _LOGIN_CONFIG.search(body):
        return body
    return _API_INFO.sub(lambda m: m.group(1) + _EMPTY_API + m.group(2), body, count=1)


class ScrubLoginPage:
    """Buffers the page gradio renders (GET `/`, `/gradio_api/runs`; never the API, files or streams)
    and scrubs it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        page = scope.get("path", "").rstrip("/") in ("", "/gradio_api/runs")
        if scope["type"] != "http" or scope.get("method") != "GET" or not page:
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def buffered(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            content_type = dict(start.get("headers", [])).get(b"content-type", b"")
            if content_type.startswith(b"text/html"):
                body = scrub(body)
                headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
                start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, buffered)


def app_kwargs() -> dict[str, Any]:
    """For `Blocks.launch(app_kwargs=...)`: a new dict each time, as gradio adds to the one it gets."""
    return {"middleware": [Middleware(ScrubLoginPage)]}
