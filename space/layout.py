"""The app: services created once, tabs composed, cross-tab wiring last.

Building the UI loads no model and starts no thread: the demo model is built on first use and
the JobManager's thread starts with the first training.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from space import texts
from space.generate_tab import build_generate_tab
from space.hardware import (
    TOY_MODEL_DIR,
    DemoModel,
    Hardware,
    SpaceInfo,
    default_cache_dir,
    default_runs_dir,
    detect_hardware,
    detect_space,
)
from space.jobs import JobManager, TrainFn, default_train
from space.train_tab import build_train_tab
from trainer.inference import PipelineCache

CSS = """
#train-status { min-height: 4em; }
footer { display: none !important; }
"""


@dataclass
class Services:
    """Everything the tabs share; tests build their own with a temporary runs_dir."""

    runs_dir: Path
    hardware: Hardware
    space: SpaceInfo
    demo: DemoModel
    jobs: JobManager
    pipelines: PipelineCache = field(default_factory=PipelineCache)

    @classmethod
    def create(
        cls,
        runs_dir: Path | None = None,
        cache_dir: Path | None = None,
        train_fn: TrainFn = default_train,
        toy_dir: Path = TOY_MODEL_DIR,
    ) -> Services:
        space = detect_space()
        return cls(
            runs_dir=Path(runs_dir) if runs_dir else default_runs_dir(space),
            hardware=detect_hardware(),
            space=space,
            demo=DemoModel(cache_dir or default_cache_dir(), toy_dir),
            jobs=JobManager(train_fn),
        )


def build_app(services: Services) -> gr.Blocks:
    s = services
    with gr.Blocks(title=texts.TITLE) as app:
        gr.Markdown(texts.INTRO)
        notice = texts.space_notice(s.space, s.hardware)
        if notice:
            with gr.Row():
                gr.Markdown(notice)
                if s.space.space_id and not s.hardware.has_gpu:
                    gr.DuplicateButton(scale=0)
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train = build_train_tab(s.jobs, s.runs_dir, s.hardware, s.demo)
            with gr.Tab("Generate", id="generate"):
                gen = build_generate_tab(s.jobs, s.runs_dir, s.hardware, s.demo, s.pipelines)
            if _has_publish_tab():
                from space.publish_tab import build_publish_tab

                with gr.Tab("Publish", id="publish"):
                    build_publish_tab(s.runs_dir)

        # Cross-tab wiring: a finished training becomes the Generate tab's model.
        train.finished_run.change(
            gen.show_run, train.finished_run, [gen.model, gen.prompt], api_visibility="private", show_progress="hidden"
        )
        app.load(gen.refresh, None, gen.model, api_visibility="private", show_progress="hidden")
    return app


def _has_publish_tab() -> bool:
    """The Publish tab is written separately; the app works without it."""
    return importlib.util.find_spec("space.publish_tab") is not None
