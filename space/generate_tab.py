"""The Generate tab: pick a run, the demo model or a Hub repo, and sample from it.

For the toy model and a run of the toy world's example, a list of suggested prompts fills the
prompt box in one click.

Pipelines are cached by model id (trainer.inference.PipelineCache); generation takes the same
GPU lock as training, so the two never run at once. Launch alone: `python -m space.generate_tab`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from space import texts
from space.example import suggested_prompts
from space.hardware import DemoModel, Hardware, default_resolution
from space.jobs import JobManager, error_message
from trainer.card import run_kind
from trainer.config import ConfigError, TrainConfig
from trainer.inference import SCHEDULERS, GenerateRequest, PipelineCache, generate

log = logging.getLogger(__name__)
MAX_SEED = 2**31 - 1
DEFAULT_SCHEDULER = "DPM++ 2M" if "DPM++ 2M" in SCHEDULERS else next(iter(SCHEDULERS))


@dataclass
class GenerateTab:
    model: gr.Dropdown
    prompt: gr.Textbox
    runs_dir: Path
    demo: DemoModel

    def refresh(self) -> Any:
        """The list of runs as it is on disk now (page load, the refresh button)."""
        return gr.update(choices=model_choices(self.runs_dir, self.demo))

    def show_run(self, run_dir: str) -> tuple[Any, Any]:
        """Select a freshly trained run and prefill its instance prompt (wired to the Train tab)."""
        if not run_dir:
            return gr.skip(), gr.skip()
        choices = model_choices(self.runs_dir, self.demo)
        return gr.update(choices=choices, value=run_dir), instance_prompt_of(run_dir) or gr.skip()


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders that hold weights, newest first."""
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and run_kind(p) is not None]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def model_choices(runs_dir: Path, demo: DemoModel) -> list[tuple[str, str]]:
    runs = [(f"{p.name} ({run_kind(p)})", str(p)) for p in list_runs(runs_dir)]
    label = "Toy demo base model (shapes world)" if demo.has_toy else "Tiny demo base model (untrained)"
    return [*runs, (label, demo.key)]


def instance_prompt_of(model: str) -> str | None:
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        return TrainConfig.load(config).instance_prompt
    except ConfigError:
        return None


def build_generate_tab(
    jobs: JobManager, runs_dir: Path, hardware: Hardware, demo: DemoModel, cache: PipelineCache
) -> GenerateTab:
    runs = model_choices(runs_dir, demo)
    first = runs[0][1]
    device = hardware.device
    dtype = torch.float16 if hardware.device == "cuda" else torch.float32
    size = demo_size(first, demo) or 512
    suggestions0 = suggested_prompts(first, demo)
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                model = gr.Dropdown(
                    runs,
                    value=first,
                    allow_custom_value=True,
                    label="Model",
                    info=texts.MODEL_SOURCE_HELP,
                    scale=4,
                    elem_id="generate-model",
                )
                refresh = gr.Button("↻ Refresh", scale=1, size="sm")
            prompt = gr.Textbox(
                instance_prompt_of(first) or "a photo of zwx dog", label="Prompt", lines=2, elem_id="generate-prompt"
            )
            suggestions = gr.Dropdown(
                suggestions0,
                value=None,
                label="Suggested prompts",
                visible=bool(suggestions0),
                elem_id="prompt-suggestions",
            )
            negative = gr.Textbox("", label="Negative prompt")
            with gr.Row():
                guidance = gr.Slider(1.0, 20.0, 7.5, step=0.5, label="Guidance scale")
                steps = gr.Slider(1, 100, 25, step=1, label="Steps", elem_id="generate-steps")
                scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed", info=texts.SEED_HELP)
                dice = gr.Button("Random seed", size="sm")
                width = gr.Number(size, precision=0, step=8, label="Width", info=texts.SIZE_HELP, elem_id="width")
                height = gr.Number(size, precision=0, step=8, label="Height", info=texts.SIZE_HELP, elem_id="height")
            with gr.Row():
                num_images = gr.Slider(1, 8, 1, step=1, label="Images")
                lora_scale = gr.Slider(0.0, 1.5, 1.0, step=0.05, label="LoRA scale")
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

    def on_model(source: str) -> tuple[Any, ...]:
        """Prefill the run's instance prompt and its suggestions; demo models sample at their native size."""
        size = demo_size(source, demo) or gr.skip()
        suggested = suggested_prompts(source, demo)
        return (
            instance_prompt_of(source) or gr.skip(),
            size,
            size,
            gr.update(choices=suggested, value=None, visible=bool(suggested)),
        )

    def generate_images(
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
    ) -> list[Image.Image]:
        """Generate images from a run folder, the demo model or a Hub repo (full or LoRA)."""
        try:
            request = GenerateRequest(
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
            )
            request.validate()
        except (TypeError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None
        if not (model or "").strip():
            raise gr.Error("Choose a model: a run, the demo model, or a Hub repo id.", print_exception=False)
        if not jobs.gpu_lock.acquire(blocking=False):
            snap = jobs.snapshot()
            raise gr.Error(texts.GENERATE_BUSY.format(step=snap.step, total=snap.total), print_exception=False)
        try:
            pipe = cache.get(demo.resolve(model), device, dtype)
            return generate(pipe, request)
        except Exception as err:
            log.info("Generation failed: %s", err)
            raise gr.Error(error_message(err), print_exception=False) from None
        finally:
            jobs.gpu_lock.release()

    private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden", "queue": False}
    model.change(on_model, model, [prompt, width, height, suggestions], **private)
    suggestions.input(lambda text: text or gr.skip(), suggestions, prompt, **private)
    dice.click(lambda: random.randint(0, MAX_SEED), None, seed, **private)
    run.click(
        generate_images,
        [model, prompt, negative, guidance, steps, scheduler, seed, width, height, num_images, lora_scale],
        gallery,
        api_name="generate",
        concurrency_id="gpu",
        concurrency_limit=1,
    )
    tab = GenerateTab(model=model, prompt=prompt, runs_dir=runs_dir, demo=demo)
    refresh.click(tab.refresh, None, model, **private)
    return tab


def demo_size(source: str, demo: DemoModel) -> int | None:
    """The native image size of a demo model, or of a run trained on one; None for anything else."""
    if not demo.is_demo(source):
        return None
    config = Path(source) / "config.json"
    if config.is_file():
        try:
            return TrainConfig.load(config).resolution
        except ConfigError:
            return None
    return default_resolution(source)


if __name__ == "__main__":
    from space.hardware import default_cache_dir, detect_hardware

    with gr.Blocks(title=texts.TITLE) as app:
        build_generate_tab(
            JobManager(), Path("runs"), detect_hardware(), DemoModel(default_cache_dir()), PipelineCache()
        )
    app.launch()
