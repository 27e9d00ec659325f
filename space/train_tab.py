"""The Train tab: the form, Start and Cancel, and a live view of the JobManager's job.

The Start handler only validates and hands the config to the JobManager; every open page draws
the job by polling it with a gr.Timer, so a closed tab loses nothing and a second visitor sees
the running job. With "publish when training finishes", Start first asks the Hub whose token it
is (seconds), and the job publishes the run when the training completes; the token only ever
travels in memory to trainer.hub. Launch alone with `python -m space.train_tab`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from huggingface_hub.utils import HFValidationError, validate_repo_id

from space import texts
from space.example import EXAMPLE_FOLDER, example_form, example_images
from space.form import Concept, form_to_config, photos_only, preset_values, prompts_for
from space.hardware import (
    DemoModel,
    Hardware,
    default_resolution,
    hub_offline,
    model_choices,
    model_settings,
    safe_defaults,
)
from space.jobs import BusyError, JobManager, PublishRequest, error_message
from space.tokens import NO_TOKEN, oauth_enabled, pick_token, token_field
from trainer.hub import HubError, check_token, suggest_repo_name

log = logging.getLogger(__name__)
MAX_PLOT_POINTS = 500
DEFAULT_IDENTIFIER = "zwx"  # a made-up word; the popular "sks" is also the name of a rifle


@dataclass
class TrainTab:
    finished_run: gr.State  # run folder of the last finished job this page has seen


def repo_suggestion(identifier: str, noun: str, username: str | None = None) -> str:
    """"zwx-dog-dreambooth" (or "alice/…" once the user is known); "" when no valid name comes out."""
    try:
        return suggest_repo_name(identifier, noun, username)
    except HubError:
        return ""


def publish_request(values: Mapping[str, Any], oauth_token: gr.OAuthToken | None) -> PublishRequest | None:
    """None when publishing is off; else the checked target and token. Raises HubError in seconds
    (no name, no token, a bad or read-only token), before any training starts."""
    if not values.get("publish_to_hub"):
        return None
    name = str(values.get("hub_repo") or "").strip()
    if not name:
        raise HubError("The repo name to publish to is missing.")
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise HubError(f"Invalid repo id {name!r}: {err} Use 'name' or 'username/name'.") from None
    token = pick_token(oauth_token, values.get("hub_token"))
    if token is None:
        raise HubError(NO_TOKEN)
    username = check_token(token, write=True)  # whoami: a bad token fails now, not after the training
    repo_id = name if "/" in name else f"{username}/{name}"
    return PublishRequest(repo_id, private=bool(values.get("hub_private", True)), token=token)


def build_train_tab(jobs: JobManager, runs_dir: Path, hardware: Hardware, demo: DemoModel) -> TrainTab:
    offline = hub_offline()
    d = safe_defaults(hardware, demo.key, offline)
    preset = preset_values(Concept.OBJECT.value, 0, d["method"])
    instance_prompt0, class_prompt0 = prompts_for(DEFAULT_IDENTIFIER, "dog", Concept.OBJECT.value)
    gr.Markdown(f"{texts.hardware_line(hardware)}\n\n{texts.demo_notice(demo.has_toy)}")
    with gr.Row():
        with gr.Column():
            images = gr.File(
                label="Instance photos", file_count="multiple", file_types=["image", ".txt"], elem_id="train-images"
            )
            gr.Markdown(texts.IMAGES_HELP)
            count = gr.Markdown(texts.images_count(0), elem_id="image-count")
            preview = gr.Gallery(label="Preview", columns=5, height=200, interactive=False)
            example = None
            if demo.has_toy:  # the example is made for the toy model
                with gr.Row():
                    example = gr.Button("Try the example", scale=0, elem_id="try-example")
                    gr.Markdown(texts.EXAMPLE_HELP)
        with gr.Column():
            concept = gr.Radio(
                [c.value for c in Concept], value=Concept.OBJECT.value, label="Concept type", info=texts.CONCEPT_HELP
            )
            with gr.Row():
                identifier = gr.Textbox(DEFAULT_IDENTIFIER, label="Identifier", info=texts.IDENTIFIER_HELP)
                class_noun = gr.Textbox("dog", label="Class noun", info=texts.CLASS_NOUN_HELP)
            instance_prompt = gr.Textbox(instance_prompt0, label="Instance prompt", info=texts.INSTANCE_PROMPT_HELP)
            class_prompt = gr.Textbox(
                class_prompt0, label="Class prompt", info=texts.CLASS_PROMPT_HELP, elem_id="class-prompt"
            )
            method = gr.Radio(
                [("LoRA", "lora"), ("Full fine-tune", "full")],
                value=d["method"],
                label="Method",
                info=texts.METHOD_HELP,
            )
            base_model = gr.Dropdown(
                model_choices(hardware, demo, offline),
                value=d["base_model"],
                allow_custom_value=True,
                label="Base model",
                info=texts.BASE_MODEL_HELP,
                elem_id="base-model",
            )
            with gr.Row():
                prior = gr.Checkbox(False, label="Prior preservation", info=texts.PRIOR_HELP)
                num_class = gr.Slider(1, 1000, 100, step=1, label="Class images")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            steps = gr.Number(preset["max_train_steps"], precision=0, label="Training steps", elem_id="steps")
            lr = gr.Number(preset["learning_rate"], label="Learning rate")
            batch = gr.Slider(1, 8, d["train_batch_size"], step=1, label="Batch size")
            accum = gr.Slider(1, 16, 1, step=1, label="Gradient accumulation")
        with gr.Row():
            train_te = gr.Checkbox(preset["train_text_encoder"], label="Train the text encoder")
            te_fraction = gr.Slider(
                0.05, 1.0, preset["text_encoder_steps_fraction"], step=0.05, label="…for this fraction of the steps"
            )
            resolution = gr.Number(d["resolution"], precision=0, step=8, label="Resolution")
        with gr.Row():
            adam8 = gr.Checkbox(d["use_8bit_adam"], label="8-bit Adam")
            checkpointing = gr.Checkbox(d["gradient_checkpointing"], label="Gradient checkpointing")
            precision = gr.Radio(["no", "fp16", "bf16"], value=d["mixed_precision"], label="Mixed precision")
            seed = gr.Number(0, precision=0, label="Seed")
        with gr.Row():
            ckpt_steps = gr.Number(500, precision=0, label="Checkpoint every N steps")
            val_prompt = gr.Textbox("", label="Validation prompt", info=texts.VALIDATION_HELP)
            val_steps = gr.Number(100, precision=0, label="Sample every N steps", elem_id="validation-steps")
    publish = gr.Checkbox(
        False, label="Publish to the Hub when training finishes", info=texts.PUBLISH_HELP, elem_id="publish-when-done"
    )
    with gr.Column(visible=False) as publish_box:
        if oauth_enabled():
            gr.LoginButton()
        with gr.Row():
            hub_repo = gr.Textbox(
                repo_suggestion(DEFAULT_IDENTIFIER, "dog"), label="Repo name", info=texts.HUB_REPO_HELP, scale=4
            )
            hub_private = gr.Checkbox(True, label="Private repo", scale=1)
        hub_token = token_field(texts.HUB_TOKEN_HELP, elem_id="train-hub-token")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start-training")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-training")
    status = gr.Markdown(texts.IDLE, elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(_loss_frame(()), x="step", y="loss", title="Loss", height=260, elem_id="loss-plot")
        samples = gr.Gallery(label="Validation samples", columns=4, height=260, elem_id="train-samples")
    warnings = gr.Textbox(label="Warnings", lines=3, max_lines=8, interactive=False)
    seen, finished_run, timer = gr.State((0, -1, 0, 0)), gr.State(""), gr.Timer(1.0)

    form: dict[str, Any] = {
        "images": images,
        "identifier": identifier,
        "class_noun": class_noun,
        "concept": concept,
        "instance_prompt": instance_prompt,
        "class_prompt": class_prompt,
        "method": method,
        "base_model": base_model,
        "with_prior_preservation": prior,
        "num_class_images": num_class,
        "max_train_steps": steps,
        "learning_rate": lr,
        "train_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "train_text_encoder": train_te,
        "text_encoder_steps_fraction": te_fraction,
        "resolution": resolution,
        "use_8bit_adam": adam8,
        "gradient_checkpointing": checkpointing,
        "mixed_precision": precision,
        "seed": seed,
        "checkpointing_steps": ckpt_steps,
        "validation_prompt": val_prompt,
        "validation_steps": val_steps,
    }
    hub_fields: dict[str, Any] = {  # read by publish_request, never by form_to_config
        "publish_to_hub": publish,
        "hub_repo": hub_repo,
        "hub_private": hub_private,
        "hub_token": hub_token,
    }

    # --- wiring: form helpers ------------------------------------------------------------
    def on_images(files: list[str] | None, kind: str, how: str, before: int) -> tuple[Any, ...]:
        """Preview and count (caption files aside); the preset's steps follow the number of photos,
        only when it changes."""
        paths = photos_only(files or [])
        n = len(paths)
        new_steps = preset_values(kind, n, how)["max_train_steps"] if n != before else gr.skip()
        return paths, texts.images_count(n), new_steps, n

    def on_preset(files: list[str] | None, kind: str, how: str) -> tuple[Any, ...]:
        p = preset_values(kind, len(photos_only(files or [])), how)
        return p["max_train_steps"], p["learning_rate"], p["train_text_encoder"], p["text_encoder_steps_fraction"]

    private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden", "queue": False}
    n_images = gr.State(0)
    images.change(on_images, [images, concept, method, n_images], [preview, count, steps, n_images], **private)
    # The presets and prompts follow what the visitor picks and types (.input), never what a handler
    # writes: the example sets its own steps and prompts, and a preset must not overwrite them.
    gr.on(
        [concept.input, method.input],
        on_preset,
        [images, concept, method],
        [steps, lr, train_te, te_fraction],
        **private,
    )
    gr.on(
        [identifier.input, class_noun.input, concept.input],
        prompts_for,
        [identifier, class_noun, concept],
        [instance_prompt, class_prompt],
        **private,
    )
    base_model.change(default_resolution, base_model, resolution, **private)

    def try_example() -> dict[Any, Any]:
        """Fill the form with the toy world's example: its five photos, prompts, model and settings."""
        photos = example_images(runs_dir / EXAMPLE_FOLDER)
        values = example_form(photos, demo.key)
        # n_images is set too, so that the upload's change event keeps the example's steps.
        filled = {preview: photos, count: texts.images_count(len(photos)), n_images: len(photos)}
        return {**{form[key]: value for key, value in values.items()}, **filled}

    if example is not None:
        example.click(try_example, None, [*form.values(), preview, count, n_images], **private)

    def prefill_repo(ident: str, noun: str, profile: gr.OAuthProfile | None) -> Any:
        return repo_suggestion(ident, noun, profile.username if profile else None) or gr.skip()

    publish.change(lambda on: gr.Column(visible=on), publish, publish_box, **private)
    gr.on([identifier.change, class_noun.change], prefill_repo, [identifier, class_noun], hub_repo, **private)

    # --- wiring: the job -----------------------------------------------------------------
    def start_training(oauth_token: gr.OAuthToken | None = None, **values: Any) -> str:
        """Validate the form (and the token, when publishing) and start a training in the background."""
        try:
            config = form_to_config(values, runs_dir, resolve_model=demo.resolve, model_settings=model_settings)
            snap = jobs.start(config, publish=publish_request(values, oauth_token))
        except BusyError as err:
            raise gr.Error(str(err)) from None
        except Exception as err:  # every engine check lands here with its own words
            log.info("Training refused: %s", err)
            raise gr.Error(error_message(err), print_exception=False) from None
        return texts.job_status(snap)

    def cancel_training() -> str:
        """Stop the running training at its next step; its checkpoint is kept."""
        if jobs.cancel():
            return "Cancelling at the next step…"
        if jobs.snapshot().publishing:
            return "The training has finished and is being published; publishing cannot be cancelled."
        return "No training is running."

    def poll(last: tuple[int, int, int, int]) -> tuple[Any, ...]:
        """Redraw only what changed since this page last drew (job id, version, #samples, #warnings)."""
        snap = jobs.snapshot()
        now = (snap.job_id, snap.version, len(snap.samples), len(snap.warnings))
        if now == tuple(last):
            return (gr.skip(),) * 6
        same_job = now[0] == last[0]
        done = (snap.state in ("completed", "cancelled") or snap.publishing) and snap.run_dir
        return (
            now,
            texts.job_status(snap),
            _loss_frame(snap.losses),
            gr.skip() if same_job and now[2] == last[2] else list(snap.samples),
            gr.skip() if same_job and now[3] == last[3] else "\n".join(snap.warnings),
            snap.run_dir if done else gr.skip(),
        )

    start.click(
        start_training, None, status, inputs_kwargs={**form, **hub_fields}, api_name="train", concurrency_id="gpu"
    )
    cancel.click(cancel_training, None, status, api_name="cancel", concurrency_limit=None)
    timer.tick(
        poll,
        seen,
        [seen, status, loss_plot, samples, warnings, finished_run],
        api_visibility="private",
        show_progress="hidden",
        concurrency_limit=None,
    )

    def current_job() -> dict[str, Any]:
        """The current training job as plain data: state, phase, step, total, run_dir, error, samples, losses,
        hub_url and publish_error."""
        return jobs.snapshot().as_dict()

    gr.api(current_job, api_name="job_status")
    return TrainTab(finished_run=finished_run)


def _loss_frame(losses: tuple[tuple[int, float], ...]) -> pd.DataFrame:
    points = list(losses)[:: max(1, len(losses) // MAX_PLOT_POINTS)]  # long runs: every k-th step
    # Typed columns even when empty: the plot reads "quantitative" axes from the dtypes.
    return pd.DataFrame(
        {
            "step": pd.Series([p[0] for p in points], dtype="int64"),
            "loss": pd.Series([p[1] for p in points], dtype="float64"),
        }
    )


if __name__ == "__main__":
    from space.hardware import default_cache_dir, detect_hardware

    with gr.Blocks(title=texts.TITLE) as app:
        build_train_tab(JobManager(), Path("runs"), detect_hardware(), DemoModel(default_cache_dir()))
    app.launch()
