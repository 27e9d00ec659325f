"""A small Hugging Face Hub, enough for the real huggingface_hub client to publish and download.

It speaks the HTTP protocol of the endpoints the client calls for whoami, create_repo,
upload_folder (YAML check, preupload, the LFS batch API with basic transfers, the ndjson commit)
and snapshot_download (repo info, recursive tree, HEAD/GET resolve). Repos live in memory with
their commit history. Xet is not spoken: the client must run with HF_HUB_DISABLE_XET.

Accounts: WRITE_TOKEN belongs to USER with the write role; READ_TOKEN to the same user, read-only
(403 on create and commit); any other token is rejected (401). USER may write only under its own
namespace (403 elsewhere).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
WRITE_TOKEN = "hf_fakeWriteTokenForTheTestHub0001"
READ_TOKEN = "hf_fakeReadOnlyTokenForTheTestHub01"
# What the Hub's default .gitattributes sends to LFS (abridged), and its size threshold.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.png", "*.jpg", "*.model")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()


@dataclass(frozen=True)
class Account:
    name: str
    role: str  # "write" or "read"


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        spec = "https://git-lfs.github.com/spec/v1"
        return f"version {spec}\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        """git's blob id of what git stores: the content, or the LFS pointer."""
        stored = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    oid: str
    message: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    gated: bool = False  # its files only for accounts in `granted` (as FLUX.1-dev's after accepting its license)
    granted: set[str] = field(default_factory=set)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint for HF_ENDPOINT."""

    def __init__(self) -> None:
        self.accounts = {WRITE_TOKEN: Account(USER, "write"), READ_TOKEN: Account(USER, "read")}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- what tests read ---------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None
        return {path: blob.data for path, blob in commit.files.items()}

    # --- state changes (called under the lock) -----------------------------------------
    def commit(self, repo: Repo, message: str, files: dict[str, Blob]) -> Commit:
        parent = repo.commits[-1].oid if repo.commits else ""
        digest = hashlib.sha1(f"{parent}\n{message}\n{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{files[path].git_oid}".encode())
        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # the Hub's format
        commit = Commit(digest.hexdigest(), message, files, date)
        repo.commits.append(commit)
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the tests read hub.requests
        pass

    # --- plumbing ----------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        body = self._read_body()
        with self.hub.lock:
            self.hub.requests.append((method, path))
        try:
            for route_method, pattern, handler in _ROUTES:
                match = re.fullmatch(pattern, path)
                if match and method in route_method:
                    handler(self, method, match, query, body)
                    return
            with self.hub.lock:
                self.hub.unhandled.append((method, path))
            raise HubError(404, f"No route for {method} {path}")
        except HubError as err:
            headers = dict(err.headers)
            headers["X-Error-Message"] = err.message
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers, head=method == "HEAD")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, data: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _json(self, payload: Any, status: int = 200, headers: dict | None = None, head: bool = False) -> None:
        headers = {"Content-Type": "application/json", **(headers or {})}
        self._send(status, json.dumps(payload).encode(), headers, head)

    # --- auth --------------------------------------------------------------------------
    def account(self, required: bool = True) -> Account | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            if required:
                raise HubError(401, "Invalid credentials in Authorization header")
            return None
        token = auth.removeprefix("Bearer ").strip()
        account = self.hub.accounts.get(token)
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return account

    def readable_repo(self, repo_id: str) -> Repo:
        account = self.account(required=False)
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and (account is None or account.name != repo_id.split("/")[0])):
            status = 401 if account is None else 404
            raise HubError(status, "Repository not found", code="RepoNotFound")
        return repo

    def writable_repo(self, repo_id: str) -> Repo:
        account = self.account()
        repo = self.readable_repo(repo_id)
        assert account is not None
        if account.role != "write" or account.name != repo_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo


# --- endpoints ---------------------------------------------------------------------------
def _whoami(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    account = h.account()
    assert account is not None
    h._json(
        {
            "type": "user",
            "id": "0" * 24,
            "name": account.name,
            "fullname": account.name.title(),
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": account.role}},
        }
    )


def _create_repo(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    account = h.account()
    assert account is not None
    payload = json.loads(body)
    namespace = payload.get("organization") or account.name
    repo_id = f"{namespace}/{payload['name']}"
    if payload.get("type", "model") != "model":
        raise HubError(400, "This test Hub only hosts models")
    if account.role != "write" or namespace != account.name:
        raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
    url = f"{h.hub.url}/{repo_id}"
    with h.hub.lock:
        if repo_id in h.hub.repos:
            h._json({"error": "You already created this model repo", "url": url}, 409)
            return
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        h.hub.commit(repo, "initial commit", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        h.hub.repos[repo_id] = repo
    h._json({"url": url, "name": repo_id, "id": "1" * 24})


def _validate_yaml(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    content = json.loads(body)["content"]
    found = re.match(r"^---\r?\n(.*?)\r?\n---", content, re.DOTALL)
    try:
        metadata = yaml.safe_load(found.group(1)) if found else {}
    except yaml.YAMLError as err:
        h._json({"errors": [{"message": f"Invalid YAML: {err}"}]}, 400)
        return
    if not isinstance(metadata, dict):
        h._json({"errors": [{"message": "The metadata must be a YAML mapping"}]}, 400)
        return
    h._json({"warnings": [] if metadata else [{"message": "Empty metadata"}]})


def _repo_info(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    repo_id = match["repo"]
    repo = h.readable_repo(repo_id)
    commit = _resolve(repo, match["rev"] or "main")
    h._json(
        {
            "_id": "1" * 24,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": "manual" if repo.gated else False,
            "tags": [],
            "lastModified": commit.date,
            "createdAt": repo.commits[0].date,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
    )


def _tree(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    repo = h.readable_repo(match["repo"])
    commit = _resolve(repo, match["rev"])
    recursive = query.get("recursive", ["false"])[0].lower() == "true"
    prefix = (match["path"] or "").strip("/")
    entries: dict[str, dict] = {}
    for path, blob in sorted(commit.files.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1 :] if prefix else path
        parts = rest.split("/")
        for depth in range(1, len(parts)):  # the folders on the way
            folder = "/".join(([prefix] if prefix else []) + parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
        if recursive or len(parts) == 1:
            entry = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            entries[path] = entry
    h._json(list(entries.values()))


def _preupload(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    repo = h.writable_repo(match["repo"])
    head = _resolve(repo, match["rev"])
    answers = []
    for item in json.loads(body)["files"]:
        path, size = item["path"], item["size"]
        lfs = size > LFS_THRESHOLD or any(fnmatchcase(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
        existing = head.files.get(path)
        answers.append(
            {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
                "oid": existing.etag if existing is not None else None,
            }
        )
    h._json({"files": answers})


def _lfs_batch(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    h.writable_repo(match["repo"])
    request = json.loads(body)
    if request.get("operation") != "upload":
        raise HubError(400, "Only uploads are supported")
    objects = []
    for obj in request["objects"]:
        oid, size = obj["oid"], obj["size"]
        answer: dict[str, Any] = {"oid": oid, "size": size}
        if oid not in h.hub.lfs:
            answer["authenticated"] = True
            answer["actions"] = {
                "upload": {"href": f"{h.hub.url}/_lfs/upload/{oid}"},
                "verify": {"href": f"{h.hub.url}/{match['repo']}.git/info/lfs/objects/verify"},
            }
        objects.append(answer)
    lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
    h._json({"transfer": "basic", "objects": objects}, headers=lfs_json)


def _lfs_upload(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    # The stand-in for the pre-signed storage URL: no auth, the content must match its sha256.
    oid = match["oid"]
    if hashlib.sha256(body).hexdigest() != oid:
        raise HubError(400, "Content does not match its oid")
    with h.hub.lock:
        h.hub.lfs[oid] = body
    h._send(200, b"", {"ETag": f'"{oid}"'})


def _lfs_verify(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    h.writable_repo(match["repo"])
    obj = json.loads(body)
    stored = h.hub.lfs.get(obj["oid"])
    if stored is None or len(stored) != obj["size"]:
        raise HubError(404, f"LFS object {obj['oid']} was not uploaded")
    h._json({"message": "verified"})


def _commit(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    repo_id = match["repo"]
    repo = h.writable_repo(repo_id)
    if match["rev"] != "main":
        raise HubError(400, "Commits go to main in this test Hub")
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    with h.hub.lock:
        files = dict(repo.head.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = h.hub.lfs.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} is missing")
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key != "header":
                raise HubError(400, f"Unknown commit operation {key}")
        commit = h.hub.commit(repo, header["summary"], files)
    h._json(
        {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{h.hub.url}/{repo_id}/commit/{commit.oid}",
            "pullRequestUrl": None,
        }
    )


def _resolve_file(h: _Handler, method: str, match: re.Match, query: dict, body: bytes) -> None:
    repo = h.readable_repo(match["repo"])
    if repo.gated:
        account = h.account(required=False)
        if account is None or account.name not in repo.granted:
            raise HubError(401 if account is None else 403, f"Access to model {repo.repo_id} is restricted. You must "
                           "have access to it and be authenticated to access it. Please log in.", code="GatedRepo")
    commit = _resolve(repo, match["rev"])
    blob = commit.files.get(match["path"])
    if blob is None:
        raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Repo-Commit": commit.oid,
        "ETag": f'"{blob.git_oid}"',
        "Accept-Ranges": "bytes",
    }
    if blob.lfs:
        headers["X-Linked-Etag"] = f'"{blob.sha256}"'
        headers["X-Linked-Size"] = str(len(blob.data))
    data, status = blob.data, 200
    ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
    if ranged:
        start = int(ranged[1])
        end = int(ranged[2]) if ranged[2] else len(data) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        data, status = data[start : end + 1], 206
    h._send(status, data, headers, head=method == "HEAD")


def _resolve(repo: Repo, revision: str) -> Commit:
    commit = repo.resolve(revision)
    if commit is None:
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
    return commit


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("GET", r"/api/whoami-v2", _whoami),
    ("POST", r"/api/repos/create", _create_repo),
    ("POST", r"/api/validate-yaml", _validate_yaml),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", _repo_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", _tree),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _commit),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _lfs_batch),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", _lfs_verify),
    ("PUT", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", _lfs_upload),
    ("GET HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _resolve_file),
]
