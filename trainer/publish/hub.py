"""Publish a run folder to the Hugging Face Hub, and download published models back.

Everything goes through huggingface_hub's own client (whoami, create_repo, create_commit,
snapshot_download). Every failure leaves as a HubError whose message says what to do; none of
them, nor anything this module writes or logs, contains the token.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from trainer.config import UserError
from trainer.publish.card import write_model_card
from trainer.run_folder import (
    CARD_NAME,
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    KOHYA_LORA_WEIGHTS,
    LOGS_DIR,
    LORA_WEIGHTS,
    METRICS_NAME,
    PIPELINE_INDEX,
    SAMPLES_DIR,
    read_config,
    run_kind,
)

TOKEN_ENV = "HF_TOKEN"
TOKENS_URL = "https://huggingface.co/settings/tokens"
LIBRARY_NAME = "dreambooth-studio"
# A model repo gets the weights, the card, its sample images and the run's config; never the
# checkpoints, logs or metrics. Pickle formats are never uploaded nor downloaded.
_NEVER = [f"{CHECKPOINTS_DIR}/*", f"{LOGS_DIR}/*", METRICS_NAME, "*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl"]
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", CARD_NAME]
UNTOUCHED = " The local run is untouched and can be published later."
# What the client raises when the Hub says no or cannot be reached (HfHubHTTPError is both an
# httpx2.HTTPError and an OSError; LFS transfer failures come wrapped in a RuntimeError).
_HUB_FAILURES = (httpx2.HTTPError, OSError, ValueError, RuntimeError)


class HubError(UserError):
    """A publish or download that failed; the message is meant for the user as is."""


class HubInputError(HubError, ValueError):
    """The request itself is wrong (a malformed repo id, a folder that is no run), whatever the Hub says."""


@dataclass(frozen=True)
class PublishResult:
    url: str
    commit: str
    repo_id: str


def resolve_token(token: str | None = None, env_var: str = TOKEN_ENV) -> str | None:
    """The token to use: `token` if given, else $`env_var`, else the one saved by `hf auth login`."""
    for candidate in (token, os.environ.get(env_var), get_token()):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


def hub_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else $HF_ENDPOINT read now (huggingface_hub reads it only at import)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_token(token: str | None, endpoint: str | None = None, *, write: bool = True) -> str:
    """Ask the Hub who owns `token` (seconds, before hours of training); return the username."""
    token = resolve_token(token)
    if token is None:
        raise HubError(
            "No Hugging Face token: sign in, set the HF_TOKEN environment variable, or paste a token "
            f"with write access ({TOKENS_URL})."
        )
    api = HfApi(endpoint=hub_endpoint(endpoint), library_name=LIBRARY_NAME)
    try:
        info = api.whoami(token=token)
    except _HUB_FAILURES as err:
        raise _hub_error(err, "check the token", token=token, endpoint=api.endpoint) from None
    role = (info.get("auth", {}).get("accessToken") or {}).get("role")
    if write and role == "read":
        raise HubError(
            f"The token of {info.get('name')} is read-only: publishing needs a token with the 'write' role "
            f"({TOKENS_URL})."
        )
    return str(info["name"])


def publish(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
) -> PublishResult:
    """Create `repo_id` if needed and commit the run's model files to it; return the link.

    A second publish to the same repo is a new commit (none if nothing changed). On any failure
    the run folder is left as it was, so it can be published later.
    """
    run_dir = Path(run_dir)
    # 1. check everything local before the network
    repo_id = check_repo_id(repo_id)
    kind = _check_publishable(run_dir)
    steps = read_config(run_dir).max_train_steps  # a broken config fails here
    # 2. the token and its owner
    token = resolve_token(token)
    try:
        username = check_token(token, endpoint)
    except HubError as err:
        raise HubError(f"{err}{UNTOUCHED}") from None
    if "/" not in repo_id:
        repo_id = f"{username}/{repo_id}"
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token, library_name=LIBRARY_NAME)
    # 3. the repo (an existing one is fine: it gets a new commit)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except _HUB_FAILURES as err:
        action = f"create {repo_id}"
        raise _hub_error(
            err, action, token=token, endpoint=api.endpoint, repo_id=repo_id, suffix=UNTOUCHED
        ) from None
    # 4. the card names the repo; restored if the upload fails
    card = run_dir / CARD_NAME
    previous_card = card.read_bytes() if card.is_file() else None
    write_model_card(run_dir, repo_id)
    try:
        info = api.create_commit(
            repo_id=repo_id,
            operations=_upload_operations(run_dir),
            commit_message=f"DreamBooth {kind}: {run_dir.name} ({steps} steps)",
        )
    except _HUB_FAILURES as err:
        if previous_card is None:
            card.unlink(missing_ok=True)
        else:
            card.write_bytes(previous_card)
        action = f"upload to {repo_id}"
        raise _hub_error(
            err, action, token=token, endpoint=api.endpoint, repo_id=repo_id, suffix=UNTOUCHED
        ) from None
    return PublishResult(url=f"{api.endpoint}/{repo_id}", commit=info.oid, repo_id=repo_id)


def upload_patterns(run_dir: Path) -> list[str]:
    """What belongs in the model repo: the card, config, samples and weights of this kind of run."""
    patterns = [CARD_NAME, CONFIG_NAME, f"{SAMPLES_DIR}/*.png"]
    if run_kind(run_dir) == "lora":
        return [*patterns, LORA_WEIGHTS, KOHYA_LORA_WEIGHTS]
    # A pipeline's components are the folders its model_index.json names.
    index = json.loads((run_dir / PIPELINE_INDEX).read_text(encoding="utf-8"))
    components = [name for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list)]
    return [*patterns, PIPELINE_INDEX, *(f"{name}/*" for name in components)]


def _upload_operations(run_dir: Path) -> list[CommitOperationAdd]:
    """The model files as they are, and config.json with local paths reduced to their names."""
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    chosen = filter_repo_objects(files, allow_patterns=upload_patterns(run_dir), ignore_patterns=_NEVER)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(run_dir / rel)) for rel in chosen
           if rel != CONFIG_NAME]
    ops.append(CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=public_config(run_dir)))
    return ops


def public_config(run_dir: Path) -> bytes:
    """The run's settings without the paths of the machine it ran on (they can name its user)."""
    config = json.loads((run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    for key in ("output_dir", "class_data_dir", "class_cache_dir", "resume_from_checkpoint"):
        if config.get(key) and config[key] != "latest":
            config[key] = Path(config[key]).name
    config["instance_data"] = [Path(p).name for p in config.get("instance_data") or []]
    if Path(config.get("pretrained_model", "")).expanduser().exists():
        config["pretrained_model"] = Path(config["pretrained_model"]).name
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


def download_model(
    repo_id: str,
    token: str | None = None,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Download a model repo's safetensors weights, configs and card; return the local folder."""
    _validate_repo_id(repo_id)
    token = resolve_token(token)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            endpoint=hub_endpoint(endpoint),
            cache_dir=cache_dir,
            allow_patterns=DOWNLOAD_PATTERNS,
            ignore_patterns=_NEVER,
            library_name=LIBRARY_NAME,
        )
    except _HUB_FAILURES as err:
        raise _hub_error(
            err, f"download {repo_id}", token=token, endpoint=hub_endpoint(endpoint), repo_id=repo_id
        ) from None
    return Path(folder)


def suggest_repo_name(identifier: str, class_noun: str, username: str | None, unique: bool = False) -> str:
    """A valid repo id such as "alice/sks-dog-dreambooth"; `unique` appends a random suffix."""
    words = [w for w in (_slug(identifier), _slug(class_noun), "dreambooth") if w]
    if unique:
        words.append(secrets.token_hex(3))
    name = "-".join(words)
    prefix = f"{_slug(username)}/" if username and _slug(username) else ""
    name = name[: 96 - len(prefix)].strip("-.")
    repo_id = prefix + name
    _validate_repo_id(repo_id)
    return repo_id


def _slug(text: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", (text or "").strip())
    slug = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", slug))
    return slug.strip("-.")


def check_repo_id(repo_id: str) -> str:
    """`repo_id` without surrounding blanks, if it is one the Hub accepts ('name' or 'user/name');
    HubInputError otherwise. Checked before anything is trained or uploaded."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise HubInputError("The repo id is empty: give 'name' or 'username/name'.")
    repo_id = repo_id.strip()
    _validate_repo_id(repo_id)
    return repo_id


def _validate_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubInputError(f"Invalid repo id {repo_id!r}: {err} Use 'name' or 'username/name'.") from None
    if repo_id.endswith((".git", ".ipynb")):
        raise HubInputError(f"Invalid repo id {repo_id!r}: a repo name cannot end with .git or .ipynb.")


def _check_publishable(run_dir: Path) -> str:
    if not (run_dir / CONFIG_NAME).is_file():
        raise HubInputError(f"{run_dir} is not a run folder: it has no {CONFIG_NAME}.")
    kind = run_kind(run_dir)
    if kind is None:
        raise HubInputError(
            f"{run_dir} has no trained weights yet ({LORA_WEIGHTS} or {PIPELINE_INDEX}): "
            "finish or resume the training, then publish."
        )
    return kind


def _hub_error(
    err: Exception,
    action: str,
    *,
    token: str | None,
    endpoint: str,
    repo_id: str | None = None,
    suffix: str = "",
) -> HubError:
    """One clear message per way a Hub call fails; the token is scrubbed from anything quoted."""
    if isinstance(err, RuntimeError) and isinstance(err.__cause__, _HUB_FAILURES):
        err = err.__cause__  # "Error while uploading 'x' to the Hub." wraps the real failure
    if isinstance(err, HFValidationError):
        message = f"Invalid repo id {repo_id!r}: {err}"
    elif isinstance(err, OfflineModeIsEnabled) or (
        isinstance(err, LocalEntryNotFoundError) and isinstance(err.__cause__, OfflineModeIsEnabled)
    ):
        message = f"Cannot {action}: HF_HUB_OFFLINE is set, so the Hub is not contacted. Unset it and retry."
    elif isinstance(err, (httpx2.TransportError, LocalEntryNotFoundError)):
        message = (
            f"Cannot {action}: the Hugging Face Hub at {endpoint} cannot be reached "
            f"({type(err.__cause__ or err).__name__}). Check the network connection and retry."
        )
    elif isinstance(err, GatedRepoError):
        from trainer.families import gated_words

        message = f"Cannot {action}: {gated_words(repo_id or 'the repo')}."
    elif isinstance(err, RepositoryNotFoundError):
        message = (
            f"Cannot {action}: the repo {repo_id} does not exist, or it is private and the token "
            "cannot read it."
        )
    elif isinstance(err, (RevisionNotFoundError, EntryNotFoundError)):
        message = f"Cannot {action}: {_server_words(err)}"
    elif isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            message = (
                f"Cannot {action}: the Hub rejected the token (401 Unauthorized); it is invalid, "
                f"expired or revoked. Create a new one at {TOKENS_URL}."
            )
        elif status == 403:
            namespace = repo_id.split("/")[0] if repo_id else "it"
            message = (
                f"Cannot {action}: the token has no write permission there (403 Forbidden). Use a token "
                f"with the 'write' role, or one allowed to write to {namespace}."
            )
        elif status == 404:
            message = f"Cannot {action}: not found on the Hub (404)."
        elif status == 400:
            message = f"Cannot {action}: the Hub refused the request (400): {_server_words(err)}"
        elif status == 429:
            message = f"Cannot {action}: too many requests to the Hub (429). Wait a minute and retry."
        elif status >= 500:
            message = f"Cannot {action}: the Hub is having trouble ({status}). Retry in a few minutes."
        else:
            message = f"Cannot {action}: the Hub answered {status}: {_server_words(err)}"
    else:
        message = f"Cannot {action}: {type(err).__name__}: {err}"
    return HubError(scrub_token(message + suffix, token))


def _server_words(err: HfHubHTTPError) -> str:
    return getattr(err, "server_message", None) or str(err).strip().splitlines()[0]


def scrub_token(text: str, token: str | None) -> str:
    """`text` with every copy of `token` replaced by hf_***: what may be shown or logged of a failure."""
    return text.replace(token, "hf_***") if token else text

