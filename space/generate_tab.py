"""The Generate tab: pick a run, the toy model or a Hub repo, and sample from it.

For the toy model and a run of the toy world's example, a list of suggested prompts fills the
prompt box in one click. Picking a model sets the image size where the app knows the model's
own: the toy model's, an SDXL run's 1024 px, a known Hub id's (space.presets.KNOWN_MODELS).

Pipelines are cached by model id (trainer.inference.PipelineCache); generation takes the same
GPU lock as training, so the two never run at once. The widgets' defaults and ranges are the
engine's (trainer.inference.GenerateRequest). The handlers are module-level functions over a
GenerateDeps; build_generate_tab only lays out and wires. Launch alone: `python -m space.generate_tab`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from space import texts
from space.errors import error_message
from space.example import TOY_PROMPTS, suggested_prompts
from space.fair_use import FairUseError
from space.hardware import Hardware
from space.jobs import JobManager
from space.presets import KNOWN_MODELS, SD, TOY_MODEL, ToyModel
from space.visitors import RunSpace, identify
from space.wiring import PRIVATE, bind, name_refusals
from trainer.config import UserError
from trainer.inference import (
    MAX_IMAGES,
    MAX_LORA_SCALE,
    MAX_SIZE,
    MAX_STEPS,
    SCHEDULERS,
    GenerateRequest,
    PipelineCache,
    TimeLimit,
    generate,
)
from trainer.run_folder import read_status, run_family, run_kind, try_read_config

log = logging.getLogger(__name__)
MAX_SEED = 2**31 - 1  # the dice's range; the engine takes any seed below 2**63
DEFAULTS = GenerateRequest(prompt="")  # the engine's defaults, which the widgets start from


@dataclass(frozen=True)
class GenerateDeps:
    """What the Generate tab's handlers use."""

    jobs: JobManager
    runs_dir: Path
    toy: ToyModel
    hardware: Hardware
    pipelines: PipelineCache
    runs: RunSpace | None = None  # Services passes the app's; default: every run in runs_dir, any folder

    def __post_init__(self) -> None:
        if self.runs is None:
            object.__setattr__(self, "runs", RunSpace.private(self.runs_dir))


@dataclass(frozen=True)
class GenerateTab:
    model: gr.Dropdown
    prompt: gr.Textbox
    refresh: Callable[..., Any]  # the visitor's runs as they are on disk now
    show_run: Callable[..., tuple[Any, Any]]  # select a freshly trained run (by name)


# --- handlers -------------------------------------------------------------------------------
def model_sources(runs: RunSpace, who: Any = None) -> list[tuple[str, str]]:
    """(label, run name) of the visitor's runs with weights, newest first, then the toy model."""
    own = [(texts.generate_run_label(run.name, run.kind), run.name) for run in runs.runs(who, with_weights=True)]
    return [*own, (texts.TOY_SOURCE_LABEL, TOY_MODEL)]


def instance_prompt_of(model: str) -> str | None:
    config = try_read_config(Path(model))
    return config.instance_prompt if config is not None else None


def native_size(toy: ToyModel, source: str) -> int | None:
    """The size a model samples best at, where the app knows it without the network; None: leave
    the size as it is. SD 1.x/2.x runs keep it (their family is 512 or 768 px, which it cannot tell)."""
    if not (source or "").strip():
        return None
    size = toy.native_size(source)
    if size is not None:
        return size
    run = Path(source)
    config = try_read_config(run)
    if config is None:  # a Hub id, or a folder that is not a run
        known = KNOWN_MODELS.get(source.strip())
        return known.resolution if known else None
    # Runs record their family in run.json, and a full run's own model_index.json names it; only a
    # LoRA run from before families would need its base model's (maybe from the Hub): SD, kept.
    if "family" not in read_status(run) and run_kind(run) != "full":
        return None
    try:
        family = run_family(run, config)
    except (UserError, OSError, ValueError):  # an unreadable run: Generate will say so
        return None
    return family.default_resolution if family.name != SD else None


def source_family(toy: ToyModel, source: str) -> Any:
    """The model family of a Generate source where the app knows it without the network; None otherwise."""
    from trainer.families import detect_family, family_by_name

    source = (source or "").strip()
    if not source or toy.is_toy(source):
        return None
    known = KNOWN_MODELS.get(source)
    if known is not None:
        return family_by_name(known.family)
    folder = Path(source)
    try:
        if try_read_config(folder) is not None:
            return run_family(folder)
        return detect_family(source) if folder.is_dir() else None
    except (UserError, OSError, ValueError):
        return None


def sampling_updates(toy: ToyModel, source: str) -> tuple[Any, Any, Any, Any]:
    """Negative prompt, guidance, steps and sampler as the source's family samples (SD 3, FLUX: their own
    scheduler, FLUX no negative prompt, their guidance and steps); left alone for SD 1.x/SDXL and the unknown."""
    family = source_family(toy, source)
    if family is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    defaults = family.sampling_defaults
    if defaults["sampler"]:  # SD 1.x/2.x, SDXL: the visitor's own guidance and steps stay
        return gr.update(visible=True), gr.skip(), gr.skip(), gr.update(visible=True)
    config = try_read_config(Path((source or "").strip()))
    known = KNOWN_MODELS.get(config.pretrained_model if config is not None else (source or "").strip())
    steps = known.steps if known is not None and known.steps else defaults["steps"]  # FLUX.1-schnell: 4
    return gr.update(visible=defaults["negative"]), defaults["guidance_scale"], steps, gr.update(visible=False)


def refresh(deps: GenerateDeps, request: gr.Request | None = None) -> Any:
    """The visitor's runs as they are on disk now (page load, the refresh button)."""
    return gr.update(choices=model_sources(deps.runs, identify(request, deps.jobs.private)))


def show_run(deps: GenerateDeps, run: str, request: gr.Request | None = None) -> tuple[Any, Any]:
    """Select a freshly trained run (by name) and prefill its instance prompt (wired to the Train tab)."""
    if not run:
        return gr.skip(), gr.skip()
    who = identify(request, deps.jobs.private)
    try:
        prompt = instance_prompt_of(deps.runs.resolve(who, run, "`model`"))
    except UserError:
        return gr.skip(), gr.skip()
    return gr.update(choices=model_sources(deps.runs, who), value=run), prompt or gr.skip()


def on_model(deps: GenerateDeps, model: str, request: gr.Request | None = None) -> tuple[Any, ...]:
    """Prefill the run's instance prompt and its suggestions; the size follows the model (native_size)."""
    try:
        source = deps.runs.resolve(identify(request, deps.jobs.private), model, "`model`")
    except UserError:  # a folder this visitor may not read: Generate will say so
        return (gr.skip(),) * 3 + (gr.update(choices=[], value=None, visible=False),) + (gr.skip(),) * 4
    size = native_size(deps.toy, source) or gr.skip()
    suggested = suggested_prompts(source, deps.toy)
    return (
        instance_prompt_of(source) or gr.skip(),
        size,
        size,
        gr.update(choices=suggested, value=None, visible=bool(suggested)),
        *sampling_updates(deps.toy, source),
    )


def use_suggestion(text: str | None) -> Any:
    return text or gr.skip()


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def generate_images(
    deps: GenerateDeps,
    model: str,
    prompt: str,
    negative_prompt: str,
    guidance_scale: float,
    steps: int,
    scheduler: str,
    seed: int,
    width: int,
    height: int,
    num_images: int,
    lora_scale: float,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio reads it from the signature)
    request: gr.Request | None = None,
) -> list[Image.Image]:
    """Generate images from one of your runs (by name), the toy model or a Hub repo (full or LoRA). While a training
    holds the GPU the request waits for it (the page shows the training's step), then draws."""
    try:
        asked = GenerateRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            guidance_scale=float(guidance_scale),
            steps=int(steps),
            scheduler=scheduler,
            seed=int(seed),
            width=int(width),
            height=int(height),
            num_images=int(num_images),
            lora_scale=float(lora_scale),
        ).validate()
        deps.jobs.limits.check_generation(asked.width, asked.height, asked.num_images, asked.steps)
    except (TypeError, ValueError, OverflowError, FairUseError) as err:  # OverflowError: int(inf) from an API client
        raise gr.Error(str(err), print_exception=False) from None
    if not (model or "").strip():
        raise gr.Error(texts.NO_MODEL, print_exception=False)
    while not deps.jobs.gpu_lock.acquire(timeout=1.0):
        snap = deps.jobs.snapshot()
        progress(None, desc=texts.GENERATE_WAITING.format(step=snap.step, total=snap.total))
    seconds = deps.jobs.limits.generate_seconds  # counted from here: waiting for a training is not generating
    try:
        dtype = torch.float16 if deps.hardware.device == "cuda" else torch.float32
        source = deps.runs.resolve(identify(request, deps.jobs.private), deps.toy.resolve(model), "`model`")
        with deps.jobs.weights_lock:  # not while "Use checkpoint" rewrites a run's weights
            pipe = deps.pipelines.get(source, deps.hardware.device, dtype)
        return generate(pipe, asked, deadline=None if seconds is None else time.monotonic() + seconds)
    except TimeLimit:
        raise gr.Error(texts.GENERATE_TIME_CAP.format(minutes=deps.jobs.limits.generate_minutes),
                       print_exception=False) from None
    except Exception as err:
        log.info("Generation failed: %s", err)
        raise gr.Error(error_message(err, not deps.jobs.private), print_exception=False) from None
    finally:
        deps.jobs.gpu_lock.release()


# --- layout ---------------------------------------------------------------------------------
def _size_box(label: str, size: int) -> gr.Number:
    """Width or height: multiples of 8 up to the engine's MAX_SIZE."""
    return gr.Number(
        size, precision=0, step=8, minimum=8, maximum=MAX_SIZE, label=label, info=texts.SIZE_HELP, elem_id=label.lower()
    )


def _settings_layout(size: int) -> tuple[dict[str, Any], gr.Button]:
    """The sampler's settings, keyed and ordered as generate_images' parameters; and the dice."""
    with gr.Row():
        guidance = gr.Slider(1.0, 20.0, DEFAULTS.guidance_scale, step=0.5, label="Guidance scale")
        steps = gr.Slider(1, MAX_STEPS, DEFAULTS.steps, step=1, label="Steps", elem_id="generate-steps")
        scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULTS.scheduler, label="Scheduler")
    with gr.Row():
        seed = gr.Number(DEFAULTS.seed, precision=0, label="Seed", info=texts.SEED_HELP)
        dice = gr.Button("Random seed", size="sm")
        width, height = _size_box("Width", size), _size_box("Height", size)
    with gr.Row():
        num_images = gr.Slider(1, MAX_IMAGES, DEFAULTS.num_images, step=1, label="Images")
        lora_scale = gr.Slider(0.0, MAX_LORA_SCALE, DEFAULTS.lora_scale, step=0.05, label="LoRA scale")
    settings = {
        "guidance_scale": guidance,
        "steps": steps,
        "scheduler": scheduler,
        "seed": seed,
        "width": width,
        "height": height,
        "num_images": num_images,
        "lora_scale": lora_scale,
    }
    return settings, dice


def build_generate_tab(deps: GenerateDeps) -> GenerateTab:
    sources = [(texts.TOY_SOURCE_LABEL, TOY_MODEL)]  # each visitor's runs come with their page's load
    first = TOY_MODEL
    size = native_size(deps.toy, first) or DEFAULTS.width
    suggestions0 = suggested_prompts(first, deps.toy)
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                model = gr.Dropdown(
                    sources,
                    value=first,
                    allow_custom_value=True,
                    label="Model",
                    info=texts.MODEL_SOURCE_HELP,
                    scale=4,
                    elem_id="generate-model",
                )
                reload = gr.Button("↻ Refresh", scale=1, size="sm")
            prompt = gr.Textbox(
                TOY_PROMPTS[0], label="Prompt", lines=2, elem_id="generate-prompt"  # what the first model draws
            )
            suggestions = gr.Dropdown(
                suggestions0,
                value=None,
                label="Suggested prompts",
                visible=bool(suggestions0),
                elem_id="prompt-suggestions",
            )
            negative = gr.Textbox(DEFAULTS.negative_prompt, label="Negative prompt")
            settings, dice = _settings_layout(size)
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(
            label="Images",
            columns=2,
            height=520,
            format="png",
            buttons=["download", "fullscreen"],
            scale=3,
            elem_id="generate-gallery",
        )

    # --- wiring
    model.change(bind(on_model, deps), model, [prompt, settings["width"], settings["height"], suggestions, negative,
                                               settings["guidance_scale"], settings["steps"], settings["scheduler"]],
                 **PRIVATE)
    suggestions.input(use_suggestion, suggestions, prompt, **PRIVATE)
    dice.click(random_seed, None, settings["seed"], **PRIVATE)
    name_refusals([model, prompt, negative, *settings.values()])
    run.click(
        bind(generate_images, deps),
        [model, prompt, negative, *settings.values()],  # generate_images' parameters, in order
        gallery,
        api_name="generate",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
    tab = GenerateTab(model=model, prompt=prompt, refresh=bind(refresh, deps), show_run=bind(show_run, deps))
    reload.click(tab.refresh, None, model, **PRIVATE)
    return tab


if __name__ == "__main__":
    from space.hardware import detect_hardware

    with gr.Blocks(title=texts.TITLE) as app:
        build_generate_tab(GenerateDeps(JobManager(), Path("runs"), ToyModel(), detect_hardware(), PipelineCache()))
    app.launch()
