"""The Train tab: the form, Start, Cancel and Resume, and a live view of the JobManager's job.

The Start handler only validates and hands the config to the JobManager, which runs it in a
process of its own or queues it behind the running one; every open page draws its visitor's job
by polling it with a gr.Timer, so a closed tab loses nothing. A visitor (space.visitors: the login,
else the browser) sees, cancels, withdraws, resumes, downloads and deletes only their own trainings and
runs (space.run_actions), and of the others only how many run and wait (the local user of an app
running privately on this machine: any). With "publish when training finishes", Start first asks the Hub whose token it
is (seconds), and the job publishes the run when the training completes; the token only ever
travels in memory to trainer.publish.hub. Launch alone with `python -m space.train_tab`.

The handlers are module-level functions over a TrainDeps (tests call them directly); the form's
fields come from space.form.FORM; build_train_tab only lays out and wires.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from space import run_actions, scores_panel, texts
from space.errors import error_message
from space.example import EXAMPLE_FOLDER, example_form, example_images
from space.form import (
    DEFAULT_CLASS_NOUN,
    DEFAULT_IDENTIFIER,
    FORM,
    checkpoint_every,
    form_to_config,
    initial_values,
    photos_only,
    preset_values,
    prompts_for,
)
from space.hardware import Hardware, hub_offline
from space.hardware_fit import base_model_values, form_memory_note, memory_pick, memory_settings, safe_defaults
from space.job_snapshot import JobSnapshot
from space.jobs import BusyError, JobManager, NotYourJob, Visitor
from space.presets import SD, TOY_MODEL, ToyModel, model_choices, model_family, model_kind, model_settings
from space.publishing import PublishRequest
from space.run_actions import RunActions, sample_gallery
from space.scores_panel import ScoresPanel
from space.tokens import NO_TOKEN, oauth_enabled, pick_token, token_field
from space.visitors import RunSpace, identify
from space.wiring import CONTROL, INSTANT, PRIVATE, bind, by_component, name_refusals
from trainer.publish.hub import HubError, check_repo_id, check_token, suggest_repo_name

log = logging.getLogger(__name__)
MAX_PLOT_POINTS = 500
LOSS_SMOOTHING = 0.9  # the moving average's weight on the steps before: a diffusion loss is noisy step to step
# The form fields a new base model may set (space.hardware_fit.base_model_values), in on_base_model's order.
BASE_MODEL_FIELDS = (
    "resolution",
    "lora_rank",
    "learning_rate",
    "method",
    "train_text_encoder",
    "mixed_precision",
    "use_8bit_adam",
    "gradient_checkpointing",
    "cache_latents",
    "train_batch_size",
    "sample_batch_size",
    "quantize_base",
)
# The fields the memory line reads (space.hardware_fit.form_config), in memory_hint's order.
MEMORY_FIELDS = (
    "base_model",
    "method",
    "resolution",
    "use_8bit_adam",
    "gradient_checkpointing",
    "mixed_precision",
    "train_batch_size",
    "train_text_encoder",
    "with_prior_preservation",
    "preservation",
    "lora_rank",
    "cache_latents",
    "gradient_accumulation_steps",
    "sample_batch_size",
    "score_checkpoints",
)


@dataclass(frozen=True)
class TrainDeps:
    """What the Train tab's handlers use."""

    jobs: JobManager
    runs_dir: Path
    toy: ToyModel
    hardware: Hardware
    runs: RunSpace | None = None  # Services passes the app's; default: every run in runs_dir, any folder

    def __post_init__(self) -> None:
        if self.runs is None:
            object.__setattr__(self, "runs", RunSpace.private(self.runs_dir))


@dataclass(frozen=True)
class PollState:
    """What a page last drew of the job; the poll redraws only what changed since."""

    job_id: int = 0
    version: int = -1
    n_samples: int = 0
    n_warnings: int = 0
    others: tuple[int, int] = (0, 0)  # other visitors' trainings: running, queued
    resumable: bool = False
    n_scores: int = 0  # the scores panel's: checkpoints scored, the pick, whether it trains, whose it is
    pick: int | None = None
    pending: bool = False
    mine: bool = False

    @classmethod
    def of(cls, snap: JobSnapshot, others: tuple[int, int] = (0, 0), mine: bool = False) -> PollState:
        return cls(snap.job_id, snap.version, len(snap.samples), len(snap.warnings), others, snap.resumable,
                   len(snap.scores.rows), snap.scores.pick, snap.active or snap.queued, mine)

    def same_scores(self, other: PollState) -> bool:
        return (self.job_id, self.n_scores, self.pick, self.pending, self.mine) == (
            other.job_id, other.n_scores, other.pick, other.pending, other.mine)


@dataclass(frozen=True)
class TrainTab:
    finished_run: gr.State  # the name of the last finished run this page has seen
    poll: dict[str, Any]  # the timer's poll as event arguments, for the page's load to draw the job at once


# --- handlers: the form ---------------------------------------------------------------------
def on_images(files: list[str] | None, kind: str, how: str, before: int) -> tuple[Any, ...]:
    """Preview and count (caption files aside); the preset's steps follow the number of photos,
    only when it changes."""
    paths = photos_only(files or [])
    n = len(paths)
    new_steps = preset_values(kind, n, how)["max_train_steps"] if n != before else gr.skip()
    return paths, texts.images_count(n), new_steps, n


def on_preset(deps: TrainDeps, files: list[str] | None, kind: str, how: str, base_model: str) -> tuple[Any, ...]:
    """Steps, learning rate and text-encoder training of a concept preset; the text encoder only where
    the settings picked for this GPU train it (space.hardware_fit.pick)."""
    family = model_family(base_model or "") or SD
    p = preset_values(kind, len(photos_only(files or [])), how, family)
    fits = base_model == TOY_MODEL or memory_settings(deps.hardware, family).get("train_text_encoder", True)
    return p["max_train_steps"], p["learning_rate"], p["train_text_encoder"] and fits, p["text_encoder_steps_fraction"]


def on_base_model(deps: TrainDeps, base_model: str | None, previous: str | None) -> tuple[Any, ...]:
    """The BASE_MODEL_FIELDS a newly picked base model sets (skipping the rest), its kind, and the line
    that says what was picked for this GPU and why (when a new family brought new settings)."""
    kind, values = base_model_values(deps.hardware, base_model or "", previous)
    why = pick_line(deps.hardware, base_model or "") if "method" in values else gr.skip()
    return (*(values.get(key, gr.skip()) for key in BASE_MODEL_FIELDS), kind or gr.skip(), why)


def pick_line(hardware: Hardware, base_model: str) -> Any:
    """What the app picked for this GPU and why (space.hardware_fit.pick); hidden off CUDA and for the toy model."""
    family = model_family(base_model)
    why = memory_pick(hardware, family, base_model).why if family and base_model.strip() != TOY_MODEL else ""
    return gr.update(value=why, visible=bool(why))


def memory_hint(deps: TrainDeps, *values: Any) -> Any:
    """The memory line for MEMORY_FIELDS' values: fits / does not fit this GPU (x of y GB)."""
    note = form_memory_note(deps.hardware, dict(zip(MEMORY_FIELDS, values, strict=True)))
    return gr.update(value=note or "", visible=note is not None)


def on_steps(steps: Any, scored: bool) -> Any:
    """While scoring is on, checkpoints (each one scored) follow the training steps: SCORED_CHECKPOINTS a run."""
    if not scored or isinstance(steps, bool) or not isinstance(steps, int | float) or steps < 1:
        return gr.skip()  # off, or a number box being edited
    return checkpoint_every(int(steps))


def try_example(deps: TrainDeps) -> dict[str, Any]:
    """Fill the form with the toy world's example: its five photos, prompts, model and settings
    (by form key, plus the photos' preview, count and n_images)."""
    photos = example_images(deps.runs_dir / EXAMPLE_FOLDER)
    # n_images is set too, so that the upload's change event keeps the example's steps.
    filled = {"preview": photos, "count": texts.images_count(len(photos)), "n_images": len(photos)}
    return {**example_form(photos, TOY_MODEL), **filled}


# --- handlers: publishing -------------------------------------------------------------------
def repo_suggestion(identifier: str, noun: str, username: str | None = None) -> str:
    """ "zwx-dog-dreambooth" (or "alice/…" once the user is known); "" when no valid name comes out."""
    try:
        return suggest_repo_name(identifier, noun, username)
    except HubError:
        return ""


def prefill_repo(ident: str, noun: str, profile: gr.OAuthProfile | None) -> Any:
    return repo_suggestion(ident, noun, profile.username if profile else None) or gr.skip()


def show_publish_box(on: bool) -> gr.Column:
    return gr.Column(visible=on)


def publish_request(values: Mapping[str, Any], oauth_token: gr.OAuthToken | None) -> PublishRequest | None:
    """None when publishing is off; else the checked target and token. Raises HubError in seconds
    (no name, a name the Hub refuses (trainer.publish.hub.check_repo_id), no token, a bad or read-only
    token), before any training starts."""
    if not values.get("publish_to_hub"):
        return None
    name = str(values.get("hub_repo") or "").strip()
    if not name:
        raise HubError("The repo name to publish to is missing.")
    name = check_repo_id(name)
    token = pick_token(oauth_token, values.get("hub_token"))
    if token is None:
        raise HubError(NO_TOKEN)
    username = check_token(token, write=True)  # whoami: a bad token fails now, not after the training
    repo_id = name if "/" in name else f"{username}/{name}"
    return PublishRequest(repo_id, private=bool(values.get("hub_private", True)), token=token)


# --- handlers: the job ----------------------------------------------------------------------
def visitor(deps: TrainDeps, request: gr.Request | None) -> Visitor | None:
    """Who asks (space.visitors.identify). None: called from Python, not a page."""
    return identify(request, deps.jobs.private)


def _owner(deps: TrainDeps, request: gr.Request | None) -> str | None:
    who = visitor(deps, request)
    return who.id if who else None


def start_training(
    deps: TrainDeps, oauth_token: gr.OAuthToken | None = None, request: gr.Request | None = None, **values: Any
) -> str:
    """Validate the form (and the token, when publishing) and start a training in the background, or
    queue it behind the running one."""
    who = visitor(deps, request)
    try:
        def resolve_model(model: str) -> str:
            return deps.runs.resolve(who, deps.toy.resolve(model), "`base_model`")

        folder = deps.runs.folder(who)
        config = form_to_config(values, folder, resolve_model=resolve_model, model_settings=model_settings)
        keep = bool(values.get("keep_photos")) or deps.jobs.private
        snap = deps.jobs.start(config, publish=publish_request(values, oauth_token), owner=who.id if who else None,
                               keep_photos=keep)
    except BusyError as err:
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:  # every engine check lands here with its own words
        log.info("Training refused: %s", err)
        raise gr.Error(error_message(err, not deps.jobs.private), print_exception=False) from None
    return texts.job_status(snap)


def cancel_training(deps: TrainDeps, request: gr.Request | None = None) -> str:
    """Withdraw the visitor's last queued training, else stop their running one at its next step (its
    checkpoint is kept): the least that is lost first; press again for the next."""
    who = visitor(deps, request)
    mine = deps.jobs.pending(who.id) if who else []
    queued = [snap for snap in mine if snap.queued]
    anyone = who is None or who.admin  # the local user of a private app may stop the running job
    snap = queued[-1] if queued else (mine[0] if mine else deps.jobs.snapshot() if anyone else JobSnapshot())
    if not snap.job_id:
        return texts.NOTHING_TO_CANCEL
    try:
        if deps.jobs.cancel(snap.job_id or None, who):
            return texts.WITHDRAWN if snap.queued else texts.CANCELLING
    except NotYourJob as err:
        return str(err)
    if snap.publishing:
        return texts.CANNOT_CANCEL_PUBLISHING
    return texts.NOTHING_TO_CANCEL


def resume_training(deps: TrainDeps, request: gr.Request | None = None) -> str:
    """Train the visitor's failed or cancelled run on from its last checkpoint (queued like a Start)."""
    who = visitor(deps, request)
    snap = deps.jobs.view(who.id if who else None)
    if not snap.resumable:
        raise gr.Error(texts.NOTHING_TO_RESUME, print_exception=False)
    with deps.jobs.weights_lock:  # a "Use checkpoint" rewriting the run's weights ends first (it refuses a queued run)
        pass
    try:
        resumed = deps.jobs.resume(snap.job_id, owner=who.id if who else None, visitor=who)
    except Exception as err:  # NotYourJob, or the engine's words for a run it will not resume
        raise gr.Error(error_message(err, not deps.jobs.private), print_exception=False) from None
    return texts.job_status(resumed)


def poll(deps: TrainDeps, last: PollState, request: gr.Request | None = None) -> tuple[Any, ...]:
    """(poll state, status, loss plot, samples, warnings, finished run (its name), Resume button, the run's
    Download/Delete row, then the scores panel's ScoresPanel.drawn), skipping what has not changed."""
    who = visitor(deps, request)
    snap = deps.jobs.view(who.id if who else None)
    running, waiting = deps.jobs.others(who.id if who else None)
    now = PollState.of(snap, (running, waiting), deps.jobs.owns(snap.job_id, who))
    if now == last:
        return (gr.skip(),) * (8 + len(ScoresPanel.DRAWN))
    same_job = now.job_id == last.job_id
    done = (snap.state in ("completed", "cancelled") or snap.publishing) and snap.run_dir
    others = texts.others_line(running, waiting) if not snap.queued else ""
    picked = snap.scores.pick if not snap.pending else None  # marked once the run has ended
    redraw = not same_job or now.n_samples != last.n_samples or not now.same_scores(last)
    samples = sample_gallery(snap.samples, picked) if redraw else None
    warnings = None if same_job and now.n_warnings == last.n_warnings else "\n".join(map(snap.shown, snap.warnings))
    return (  # the plot, the samples and the warnings show once there is something in them
        now,
        texts.job_status(snap) + (f"\n\n{others}" if others else ""),
        gr.update(value=loss_frame(snap.losses), visible=bool(snap.losses)),
        gr.skip() if samples is None else gr.update(value=samples, visible=bool(samples)),
        gr.skip() if warnings is None else gr.update(value=warnings, visible=bool(warnings)),
        snap.run_name if done else gr.skip(),
        gr.update(visible=snap.resumable) if now.resumable != last.resumable else gr.skip(),
        RunActions.shown(snap, now.mine),
        *((gr.skip(),) * len(ScoresPanel.DRAWN) if now.same_scores(last) else scores_panel.draw(snap, now.mine)),
    )


def use_checkpoint(deps: TrainDeps, replace: bool = False, request: gr.Request | None = None) -> tuple[Any, ...]:
    """Make the picked checkpoint of the visitor's run its weights, once it has stopped training (only its
    owner may): the line under the scores, the result, and the box that confirms replacing weights that no
    checkpoint keeps."""
    with deps.jobs.weights_lock:  # no generation loads them, no Resume starts, while they are rewritten
        return scores_panel.use_pick(deps.jobs, visitor(deps, request), bool(replace))


def use_checkpoint_api(deps: TrainDeps, replace: bool = False, request: gr.Request | None = None) -> str:
    """Make the picked checkpoint of your run its weights (`replace`: even when the weights it has now would be
    lost): what happened, in words."""
    result = use_checkpoint(deps, replace, request)[1]
    return result if isinstance(result, str) else ""


def current_job(deps: TrainDeps, request: gr.Request | None = None) -> dict[str, Any]:
    """Your training job as plain data: job_id, state, phase, step, total, queue_position, starts_in_seconds,
    resumable, run (its name), error, samples (their names), losses, hub_url, publish_error, and the scores of a
    scored run (one row of scores.jsonl per step), its pick and pick_reason."""
    return deps.jobs.view(_owner(deps, request)).as_dict()


def loss_frame(losses: tuple[tuple[int, float], ...]) -> pd.DataFrame:
    """The loss plot's long table (step, loss, series): each step's loss, and its exponential moving average
    (weight LOSS_SMOOTHING, debiased at the start, as TensorBoard smooths a curve), every k-th step of a long run."""
    steps = pd.Series([p[0] for p in losses], dtype="int64")
    raw = pd.Series([p[1] for p in losses], dtype="float64")
    smooth = raw.ewm(alpha=1 - LOSS_SMOOTHING, adjust=True).mean()
    every = max(1, len(losses) // MAX_PLOT_POINTS)  # long runs: every k-th step
    frames = [pd.DataFrame({"step": steps, "loss": values, "series": name})[::every]
              for values, name in ((raw, texts.LOSS_RAW), (smooth, texts.LOSS_SMOOTHED))]
    # Typed columns even when empty: the plot reads "quantitative" axes from the dtypes.
    return pd.concat(frames, ignore_index=True).astype({"step": "int64", "loss": "float64", "series": "object"})


# --- layout ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Photos:
    """What the tab shows beside the upload."""

    count: gr.Markdown
    preview: gr.Gallery
    example: gr.Button
    keep: gr.Checkbox  # keep the photos on a shared app once the training completes
    n_images: gr.State  # photos counted at the last upload event


@dataclass(frozen=True)
class _Job:
    start: gr.Button
    cancel: gr.Button
    resume: gr.Button
    status: gr.Markdown
    actions: RunActions
    loss_plot: gr.LinePlot
    samples: gr.Gallery
    warnings: gr.Textbox
    scores: ScoresPanel
    seen: gr.State  # a PollState
    finished_run: gr.State
    timer: gr.Timer


def _draw(place: str, values: Mapping[str, Any], more: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The components of FORM's fields at `place`, in table order."""
    return {f.key: f.widget(value=values[f.key], **f.props, **more.get(f.key, {})) for f in FORM if f.place == place}


@dataclass(frozen=True)
class _Form:
    """The form's components: FORM's fields and what the tab shows beside them."""

    fields: dict[str, Any]  # by key, in table order (the /train endpoint's parameters)
    photos: _Photos
    memory: gr.Markdown  # the memory line: fits / does not fit this GPU
    picked: gr.Markdown  # what was picked for this GPU and why
    base_kind: gr.State  # the kind of the last base model picked


def _form_layout(
    values: Mapping[str, Any], base_models: list[tuple[str, str]], note: str | None, why: Any
) -> tuple[dict[str, Any], tuple[gr.Markdown, gr.Markdown], _Photos]:
    more = {"base_model": {"choices": base_models}}
    form: dict[str, Any] = {}
    with gr.Row():
        with gr.Column():
            form |= _draw("photos", values, more)
            gr.Markdown(texts.IMAGES_HELP)
            count = gr.Markdown(texts.images_count(0), elem_id="image-count")
            preview = gr.Gallery(label="Preview", columns=5, height=200, interactive=False)
            with gr.Row():
                example = gr.Button("Try the example", scale=0, elem_id="try-example")
                gr.Markdown(texts.EXAMPLE_HELP)
            keep = gr.Checkbox(False, label="Keep my photos on the server", info=texts.KEEP_PHOTOS_HELP,
                               elem_id="keep-photos")
        with gr.Column():
            form |= _draw("concept", values, more)
            with gr.Row():
                form |= _draw("names", values, more)
            form |= _draw("prompts", values, more)
            memory = gr.Markdown(note or "", visible=note is not None, elem_id="memory-note")
            picked = gr.Markdown(why["value"], visible=why["visible"], elem_id="memory-pick")
            with gr.Row():
                form |= _draw("prior", values, more)
    with gr.Accordion("Advanced", open=False):
        for place in ("steps", "text encoder", "memory", "outputs"):
            with gr.Row():
                form |= _draw(place, values, more)
    # In table order: the /train endpoint's parameters come in this order.
    return {f.key: form[f.key] for f in FORM}, (memory, picked), _Photos(count, preview, example, keep, gr.State(0))


def _form_section(deps: TrainDeps) -> _Form:
    """The hardware line and the form, filled with the settings that fit this machine."""
    offline = hub_offline()
    gr.Markdown(f"{texts.hardware_line(deps.hardware)}\n\n{texts.toy_notice(deps.toy.installed, deps.toy.folder)}")
    machine = safe_defaults(deps.hardware, offline)
    values = initial_values(machine, model_family(machine["base_model"]) or SD)
    note = form_memory_note(deps.hardware, {key: values[key] for key in MEMORY_FIELDS})
    why = pick_line(deps.hardware, machine["base_model"])
    fields, (memory, picked), photos = _form_layout(values, model_choices(deps.hardware, offline), note, why)
    return _Form(fields, photos, memory, picked, gr.State(model_kind(machine["base_model"])))


def _publish_layout() -> tuple[dict[str, Any], gr.Column]:
    """The "publish when training finishes" fields, read by publish_request (never by form_to_config)."""
    publish = gr.Checkbox(
        False, label="Publish to the Hub when training finishes", info=texts.PUBLISH_HELP, elem_id="publish-when-done"
    )
    with gr.Column(visible=False) as box:
        if oauth_enabled():
            gr.LoginButton()
        with gr.Row():
            repo = gr.Textbox(
                repo_suggestion(DEFAULT_IDENTIFIER, DEFAULT_CLASS_NOUN),
                label="Repo name",
                info=texts.HUB_REPO_HELP,
                scale=4,
            )
            private = gr.Checkbox(True, label="Private repo", scale=1)
        token = token_field(texts.HUB_TOKEN_HELP, elem_id="train-hub-token")
    return {"publish_to_hub": publish, "hub_repo": repo, "hub_private": private, "hub_token": token}, box


def _job_layout() -> _Job:
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start-training")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-training")
        resume = gr.Button(texts.RESUME_BUTTON, visible=False, elem_id="resume-training")
    status = gr.Markdown(texts.IDLE, elem_id="train-status")
    actions = run_actions.layout()
    with gr.Row():
        loss_plot = gr.LinePlot(loss_frame(()), x="step", y="loss", color="series", title="Loss", height=260,
                                visible=False, elem_id="loss-plot")
        samples = gr.Gallery(label="Validation samples", columns=4, height=260, visible=False,
                             elem_id="train-samples")
    scores = scores_panel.layout()
    warnings = gr.Textbox(label="Warnings", lines=3, max_lines=8, interactive=False, visible=False)
    return _Job(
        start, cancel, resume, status, actions, loss_plot, samples, warnings, scores, gr.State(PollState()), gr.State(""),
        gr.Timer(1.0),
    )


def _wire_form(deps: TrainDeps, form: _Form) -> None:
    """Presets and prompts follow what the visitor picks and types (.input), never what a handler writes:
    the example sets its own steps and prompts, which must stay."""
    f, photos = form.fields, form.photos
    images, n_images = f["images"], photos.n_images
    images.change(
        on_images,
        [images, f["concept"], f["method"], n_images],
        [photos.preview, photos.count, f["max_train_steps"], n_images],
        **PRIVATE,
    )
    to_note = [f[key] for key in MEMORY_FIELDS]
    gr.on(
        [f["concept"].input, f["method"].input],
        bind(on_preset, deps),
        [images, f["concept"], f["method"], f["base_model"]],
        [f["max_train_steps"], f["learning_rate"], f["train_text_encoder"], f["text_encoder_steps_fraction"]],
        **PRIVATE,
    ).then(bind(memory_hint, deps), to_note, form.memory, **PRIVATE)
    gr.on(
        [f["identifier"].input, f["class_noun"].input, f["concept"].input],
        prompts_for,
        [f["identifier"], f["class_noun"], f["concept"]],
        [f["instance_prompt"], f["class_prompt"]],
        **PRIVATE,
    )
    # A new base model brings its size, and a new family its presets (the example's toy model only
    # its size and rank, which the example sets too); then the memory line follows what was set.
    f["base_model"].change(
        bind(on_base_model, deps),
        [f["base_model"], form.base_kind],
        [*(f[key] for key in BASE_MODEL_FIELDS), form.base_kind, form.picked],
        **PRIVATE,
    ).then(bind(memory_hint, deps), to_note, form.memory, **PRIVATE)
    gr.on([f[key].input for key in MEMORY_FIELDS[1:]], bind(memory_hint, deps), to_note, form.memory, **PRIVATE)
    gr.on(
        [f["max_train_steps"].change, f["score_checkpoints"].input],
        on_steps,
        [f["max_train_steps"], f["score_checkpoints"]],
        f["checkpointing_steps"],
        **PRIVATE,
    )
    shown = {**f, "preview": photos.preview, "count": photos.count, "n_images": n_images}
    photos.example.click(by_component(bind(try_example, deps), shown), None, list(shown.values()), **PRIVATE)


def _wire_job(deps: TrainDeps, form: _Form, hub: dict[str, Any], publish_box: gr.Column, job: _Job) -> dict[str, Any]:
    """Publishing, Start, Cancel, Resume, the scores panel's button and the poll; the poll's event arguments."""
    f = form.fields
    hub["publish_to_hub"].change(show_publish_box, hub["publish_to_hub"], publish_box, **PRIVATE)
    names = [f["identifier"], f["class_noun"]]
    gr.on([c.change for c in names], prefill_repo, names, hub["hub_repo"], **PRIVATE)
    name_refusals([*f.values(), *hub.values()])
    job.start.click(bind(start_training, deps), None, job.status,
                    inputs_kwargs={**f, **hub, "keep_photos": form.photos.keep}, api_name="train", **INSTANT)
    job.cancel.click(bind(cancel_training, deps), None, job.status, api_name="cancel", **INSTANT)
    job.resume.click(bind(resume_training, deps), None, job.status, api_name="resume", **INSTANT)
    panel = job.scores
    # Not in the GPU queue: the JobManager's weights_lock keeps generations' loads and Resume off the run's weights
    # while they are rewritten; trainer.export works on the CPU, so no training holds it up. The API's
    # /use_checkpoint answers in words, not with the page's updates.
    panel.use.click(bind(use_checkpoint, deps), panel.replace, [panel.line, panel.result, panel.replace],
                    api_name="use_checkpoint_page", api_visibility="private", **INSTANT)
    gr.api(bind(use_checkpoint_api, deps), api_name="use_checkpoint", **CONTROL)
    polled = {
        "fn": bind(poll, deps),
        "inputs": job.seen,
        "outputs": [
            job.seen, job.status, job.loss_plot, job.samples, job.warnings, job.finished_run, job.resume,
            job.actions.row, *panel.drawn,
        ],
        "api_visibility": "private",
        "show_progress": "hidden",
        "concurrency_limit": None,
    }
    job.timer.tick(**polled)
    gr.api(bind(current_job, deps), api_name="job_status", **CONTROL)
    run_actions.wire(job.actions, deps.jobs, job.status)
    return polled


def build_train_tab(deps: TrainDeps) -> TrainTab:
    """Layout first (the form, publishing, the job), then the wiring."""
    form = _form_section(deps)
    hub, publish_box = _publish_layout()
    job = _job_layout()
    _wire_form(deps, form)
    polled = _wire_job(deps, form, hub, publish_box, job)
    return TrainTab(finished_run=job.finished_run, poll=polled)


if __name__ == "__main__":
    from space.hardware import detect_hardware

    with gr.Blocks(title=texts.TITLE) as app:
        build_train_tab(TrainDeps(JobManager(), Path("runs"), ToyModel(), detect_hardware()))
    app.launch()
