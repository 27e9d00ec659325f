"""Who asks, and which runs are theirs.

A visitor is, in this order: the `--auth` login; the Hugging Face login of a Space with OAuth; the
browser (a random, HttpOnly cookie this app sets on its page, so that a reload stays the same
visitor); else the page's gradio session (an API client). One `--auth` login shared by several
people is one visitor.

On a shared app each visitor's runs live in a folder of their own under the runs folder, named by a
hash of the visitor (no login name on disk), and every handler names a run by its folder name, never
by a server path: `RunSpace.run_dir` finds it among the visitor's own runs only. A private app (see
app.runs_privately) keeps every run in the runs folder itself, and its user may name any folder.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path
from typing import Any

from space.errors import shortened
from space.jobs import Visitor
from space.local_paths import LocalPaths
from trainer.config import ConfigError
from trainer.run_folder import RunInfo, is_run, list_runs

COOKIE = "dreambooth_visitor"
COOKIE_DAYS = 30
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")
NOT_YOURS = "`{what}`: you have no run named '{name}'. Pick one of your runs from the list."


def identify(request: Any, admin: bool = False) -> Visitor | None:
    """The visitor behind a gradio request; None when called from Python (no request)."""
    if request is None:
        return None
    user = getattr(request, "username", None)
    if user:
        return Visitor(str(user), admin)
    hub = _hub_user(request)
    if hub:
        return Visitor(f"hub:{hub}", admin)
    token = _cookie(request)
    if token:
        return Visitor(f"browser:{token}", admin)
    return Visitor(f"page:{getattr(request, 'session_hash', None)}", admin)  # never None: that is the app itself


def _hub_user(request: Any) -> str | None:
    """The Hugging Face login of a Space with OAuth (gradio keeps it in the request's session)."""
    try:
        info = request.session.get("oauth_info") or {}
    except Exception:  # no session middleware: the app has no OAuth
        return None
    name = (info.get("userinfo") or {}).get("preferred_username")
    return str(name) if name else None


def _cookie(request: Any) -> str | None:
    try:
        token = request.cookies.get(COOKIE)
    except Exception:
        return None
    return token if token and _TOKEN.match(token) else None


class VisitorCookie:
    """ASGI middleware: gives a browser that opens the page without the visitor cookie a new one."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        page = scope["type"] == "http" and scope.get("method") == "GET" and scope.get("path", "").rstrip("/") == ""
        if not page or _has_cookie(scope):
            await self.app(scope, receive, send)
            return
        cookie = _set_cookie(secrets.token_urlsafe(24), _https(scope))

        async def with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, with_cookie)


def _has_cookie(scope: dict) -> bool:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, token = part.strip().partition("=")
                if name == COOKIE and _TOKEN.match(token):
                    return True
    return False


def _https(scope: dict) -> bool:
    forwarded = dict(scope.get("headers", [])).get(b"x-forwarded-proto", b"")
    return scope.get("scheme") == "https" or forwarded.split(b",")[0].strip() == b"https"


def _set_cookie(token: str, https: bool) -> bytes:
    # In a Space the page sits in an iframe of huggingface.co: a cross-site cookie must be SameSite=None,
    # Secure, and Partitioned (kept for this embedding only).
    where = "SameSite=None; Secure; Partitioned" if https else "SameSite=Lax"
    return f"{COOKIE}={token}; Path=/; Max-Age={COOKIE_DAYS * 86400}; HttpOnly; {where}".encode()


class RunSpace:
    """The runs folder, as each visitor sees it. `shared` is True until app.py finds the app private, so
    that an app built on import (a Space, `gradio app.py`) keeps visitors apart from its first request."""

    def __init__(self, runs_dir: Path, paths: LocalPaths, shared: bool = True) -> None:
        self.runs_dir = Path(runs_dir)
        self.paths = paths
        self.shared = shared

    @classmethod
    def private(cls, runs_dir: Path) -> RunSpace:
        """Every run in `runs_dir`, and any folder may be named: a private app's (and a tab launched alone)."""
        return cls(runs_dir, LocalPaths([], confined=False), shared=False)

    def folder(self, who: Visitor | None) -> Path:
        """Where `who`'s runs live: their own folder on a shared app; the runs folder on a private one,
        or for the app itself (`who` None)."""
        if who is None or not self.shared:
            return self.runs_dir
        digest = hashlib.sha256((who.id or "").encode()).hexdigest()[:24]
        return self.runs_dir / f"visitor-{digest}"

    def runs(self, who: Visitor | None, *, with_weights: bool = False) -> list[RunInfo]:
        """`who`'s runs, newest first."""
        return list_runs(self.folder(who), with_weights=with_weights)

    def run_dir(self, who: Visitor | None, name: str | None, what: str = "run") -> Path:
        """The run `who` names by its folder name; ConfigError (naming `what`) when they have none of that name.
        A private app's user may give a path instead."""
        text = (name or "").strip()
        if not self.shared and text and Path(text).is_absolute() and is_run(Path(text)):
            return Path(text)
        path = self.folder(who) / text
        if not text or Path(text).name != text or text in (".", "..") or not is_run(path):
            raise ConfigError(NOT_YOURS.format(what=what, name=shortened(text)), field=what)
        return path

    def resolve(self, who: Visitor | None, value: str, what: str) -> str:
        """A model a visitor names: one of their runs by name (its folder), else a Hub id or a folder they may
        read (their runs, the toy model; any on a private app)."""
        text = (value or "").strip()
        if text and Path(text).name == text and is_run(self.folder(who) / text):
            return str(self.folder(who) / text)
        return self.paths.check(text, what, also=(self.folder(who),))
