"""What a visitor does with their finished run on the Train tab: download it, delete it; and how the page
shows its samples.

Nothing under the runs folder is served by path (app.py gives gradio no `allowed_paths` there): the page
gets the samples as images from the poll, and the weights from Download, each for the run's owner only
(space.visitors). gradio keeps what a handler returns in its cache under a name made from a hash of the
file's bytes, so no one else can ask for it by a guessable address; a shared app also empties that cache
after the retention time (app.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from space import texts
from space.errors import error_message
from space.job_snapshot import JobSnapshot
from space.jobs import JobManager
from space.visitors import identify
from space.wiring import CONTROL, INSTANT, PRIVATE, bind
from trainer.model_files import LORA_WEIGHTS
from trainer.run_folder import (
    CHECKPOINTS_DIR,
    KOHYA_LORA_WEIGHTS,
    WEIGHTS_STAGING,
    list_sample_files,
    run_kind,
    scored_images,
    try_read_config,
)

log = logging.getLogger(__name__)
DOWNLOADS_KEPT_SECONDS = 600  # this app's own copies; gradio's cache keeps what it sends
_STORED = (".safetensors", ".bin", ".png", ".jpg", ".jpeg", ".webp")  # zipped as they are: they do not compress


@dataclass(frozen=True)
class RunActions:
    row: gr.Row
    download: gr.Button
    file: gr.File
    delete: gr.Button
    confirm: gr.Button

    @staticmethod
    def shown(snap: JobSnapshot, mine: bool) -> Any:
        """The row's visibility: the visitor's own run, once it is no longer queued or training."""
        return gr.update(visible=bool(mine and snap.run_dir and not snap.pending))


def sample_gallery(paths: Sequence[str], picked: int | None = None) -> list[tuple[Image.Image, str]]:
    """The validation samples as images (never as server paths), each captioned with its step and prompt. With
    the run's `picked` step (once it has ended): first what the scorer drew at that step (the images its pick
    was read from, which a validation prompt's sample may not show as well), then that step's samples, marked,
    then the last step's, then the rest."""
    captions: dict[str, tuple[int, str]] = {}
    scored: list[tuple[str, str]] = []
    for run_dir in {Path(p).parent.parent for p in paths}:
        config = try_read_config(run_dir)
        prompts = config.validation_prompts if config is not None else ()
        for sample in list_sample_files(run_dir):
            prompt = prompts[sample.prompt_index] if 0 <= sample.prompt_index < len(prompts) else None
            mark = " (picked)" if sample.step == picked else ""
            captions[str(sample.path)] = (sample.step, f"step {sample.step}{mark}" + (f" · {prompt}" if prompt else ""))
        if picked is not None and config is not None:
            scored += [(str(path), f"step {picked} (picked), as scored · {config.instance_prompt}")
                       for path in scored_images(run_dir, picked)]
    if picked is not None:
        last = max((captions[p][0] for p in paths if p in captions), default=None)
        first = {picked: 0, last: 1}
        paths = sorted(paths, key=lambda p: first.get(captions.get(p, (None,))[0], 2))  # stable: steps in order
    shown = []
    for path, caption in [*scored, *((p, captions[p][1] if p in captions else Path(p).stem) for p in paths)]:
        try:
            with Image.open(path) as image:
                shown.append((image.copy(), caption))
        except OSError:  # deleted with its run, or still being written: the next poll has it
            continue
    return shown


def download_run(jobs: JobManager, request: gr.Request | None = None) -> list[str]:
    """Your run's weights: a LoRA's .safetensors files (diffusers', then the one A1111, ComfyUI and kohya load),
    or a zip of a full run (the pipeline, its config, card and samples; not its checkpoints)."""
    who = identify(request, jobs.private)
    snap = jobs.view(who.id if who else None)
    if not snap.run_dir or not jobs.owns(snap.job_id, who) or snap.pending:
        raise gr.Error(texts.NOTHING_TO_DOWNLOAD, print_exception=False)
    run_dir = Path(snap.run_dir)
    kind = run_kind(run_dir)
    if kind is None:
        raise gr.Error(texts.NOTHING_TO_DOWNLOAD, print_exception=False)
    folder = _download_folder()
    with jobs.weights_lock:  # not while "Use checkpoint" rewrites them
        if kind == "full":
            target = folder / f"{run_dir.name}.zip"
            zip_run(run_dir, target)
            return [str(target)]
        copies = []
        for name, copy in ((LORA_WEIGHTS, ".safetensors"), (KOHYA_LORA_WEIGHTS, "-kohya.safetensors")):
            if (run_dir / name).is_file():
                copies.append(str(shutil.copyfile(run_dir / name, folder / f"{run_dir.name}{copy}")))
    return copies


def zip_run(run_dir: Path, target: Path) -> None:
    """`run_dir` as a zip, its checkpoints and half-saved weights left out."""
    skip = {CHECKPOINTS_DIR, WEIGHTS_STAGING}
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(run_dir.rglob("*")):
            relative = path.relative_to(run_dir)
            if path.is_file() and relative.parts[0] not in skip:
                stored = path.suffix.lower() in _STORED
                archive.write(path, Path(run_dir.name) / relative,
                              compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _download_folder() -> Path:
    """A new folder for one download, in this app's folder under the system's temp directory (where gradio
    may copy from); the app's copies of earlier downloads go after DOWNLOADS_KEPT_SECONDS."""
    root = Path(tempfile.gettempdir()) / "dreambooth-downloads"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        try:
            if time.time() - old.stat().st_mtime > DOWNLOADS_KEPT_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
    return Path(tempfile.mkdtemp(dir=root))


def delete_run(jobs: JobManager, request: gr.Request | None = None) -> str:
    """Delete your finished run from the server: its photos, weights, samples and checkpoints."""
    who = identify(request, jobs.private)
    snap = jobs.view(who.id if who else None)
    if not snap.run_dir or not jobs.owns(snap.job_id, who):
        raise gr.Error(texts.NOTHING_TO_DELETE, print_exception=False)
    try:
        with jobs.weights_lock:
            jobs.delete_run(snap.job_id, who)
    except Exception as err:  # queued or training still: the engine's words
        raise gr.Error(error_message(err, not jobs.private), print_exception=False) from None
    return texts.job_status(jobs.snapshot(snap.job_id))


def layout() -> RunActions:
    with gr.Row(visible=False) as row:
        with gr.Column(scale=0, min_width=220):
            download = gr.Button("Download weights", elem_id="download-run")
            delete = gr.Button("Delete this run", variant="stop", elem_id="delete-run")
            confirm = gr.Button(texts.DELETE_CONFIRM, variant="stop", visible=False, elem_id="confirm-delete")
        file = gr.File(label="Your weights", file_count="multiple", interactive=False, visible=False,
                       elem_id="run-download")  # shown once there is something to download
    return RunActions(row, download, file, delete, confirm)


def wire(actions: RunActions, jobs: JobManager, status: gr.Markdown) -> None:
    """Download (also the API's /download), and Delete behind a second, confirming button (/delete_run)."""

    actions.download.click(bind(download_run, jobs), None, actions.file, api_name="download", **CONTROL).then(
        lambda: gr.update(visible=True), None, actions.file, **PRIVATE)
    actions.delete.click(lambda: gr.update(visible=True), None, actions.confirm, **PRIVATE)
    actions.confirm.click(bind(delete_run, jobs), None, status, api_name="delete_run", **INSTANT).then(
        lambda: (gr.update(visible=False), gr.update(value=None, visible=False)), None, [actions.confirm, actions.file],
        **PRIVATE)


class PlainFileRefusal:
    """ASGI middleware: gradio's refusal of a file (`/gradio_api/file=…`: 403 "File not allowed: <path>")
    answered without the path that was asked for, so that a refusal never echoes a server path."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or "/file=" not in path:
            await self.app(scope, receive, send)
            return
        refused = False

        async def plain(message: dict) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message.get("status") in (403, 404):
                refused = True
                body = b'{"detail":"File not allowed."}'
                headers = [(k, v) for k, v in message.get("headers", []) if k not in (b"content-length", b"content-type")]
                message = {**message, "headers": [*headers, (b"content-type", b"application/json"),
                                                  (b"content-length", str(len(body)).encode())]}
                await send(message)
                await send({"type": "http.response.body", "body": body})
                return
            if not refused:
                await send(message)

        await self.app(scope, receive, plain)
