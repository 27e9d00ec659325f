"""The app: services created once, tabs composed, cross-tab wiring last.

Building the UI loads no model and starts no thread: the toy model is loaded on first use and
the JobManager's thread starts with the first training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from space import texts
from space.generate_tab import GenerateDeps, build_generate_tab
from space.hardware import Hardware, SpaceInfo, default_runs_dir, detect_hardware, detect_space
from space.jobs import JobManager, TrainFn, default_train
from space.presets import ToyModel
from space.publish_tab import build_publish_tab
from space.train_tab import TrainDeps, build_train_tab
from trainer.inference import PipelineCache
from trainer.toyworld import TOY_MODEL_DIR

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
    toy: ToyModel
    jobs: JobManager
    pipelines: PipelineCache = field(default_factory=PipelineCache)

    @classmethod
    def create(
        cls,
        runs_dir: Path | None = None,
        train_fn: TrainFn = default_train,
        toy_dir: Path = TOY_MODEL_DIR,
        hardware: Hardware | None = None,
        space: SpaceInfo | None = None,
    ) -> Services:
        """The services of this machine; tests pass their own hardware and toy model folder."""
        space = space or detect_space()
        return cls(
            runs_dir=Path(runs_dir) if runs_dir else default_runs_dir(space),
            hardware=hardware or detect_hardware(),
            space=space,
            toy=ToyModel(toy_dir),
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
                train = build_train_tab(TrainDeps(s.jobs, s.runs_dir, s.toy, s.hardware))
            with gr.Tab("Generate", id="generate"):
                gen = build_generate_tab(GenerateDeps(s.jobs, s.runs_dir, s.toy, s.hardware, s.pipelines))
            with gr.Tab("Publish", id="publish"):
                build_publish_tab(s.runs_dir)

        # Cross-tab wiring: a finished training becomes the Generate tab's model.
        train.finished_run.change(
            gen.show_run, train.finished_run, [gen.model, gen.prompt], api_visibility="private", show_progress="hidden"
        )
        app.load(gen.refresh, None, gen.model, api_visibility="private", show_progress="hidden")
    return app
