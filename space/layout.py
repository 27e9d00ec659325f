"""The app: services created once, tabs composed, cross-tab wiring last.

Building the UI loads no model and starts no thread: the toy model is loaded on first use and
the JobManager's thread starts with the first training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from space import login_page, texts
from space.fair_use import FairUse
from space.generate_tab import GenerateDeps, build_generate_tab
from space.hardware import Hardware, SpaceInfo, default_runs_dir, detect_hardware, detect_space
from space.job_process import JOBS_DIR
from space.job_queue import GpuMode
from space.jobs import JobManager, TrainFn
from space.local_paths import LocalPaths
from space.presets import ToyModel
from space.publish_tab import build_publish_tab
from space.run_actions import PlainFileRefusal
from space.train_tab import TrainDeps, build_train_tab
from space.visitors import RunSpace, VisitorCookie
from trainer.inference import PipelineCache
from trainer.toyworld import TOY_MODEL_DIR

GPU_MODE_ENV = "DREAMBOOTH_GPU_MODE"  # per_gpu (default) or all_gpus
CSS = """
#train-status { min-height: 4em; }
footer { display: none !important; }
"""


# Each uploaded file, on an app served beyond this machine (gradio refuses larger ones with a message):
# a phone's photo is 3-12 MB, a 16-bit TIFF of a 24 MP camera about 140 MB; the engine trains at most
# 1024 px and keeps at most MAX_IMAGES photos, so 50 MB each is room enough and bounds a visitor's disk.
MAX_UPLOAD = "50mb"

# Gradio keeps one SessionState per browser session (each holds its own copy of the page's config,
# about 220 KB for this UI, measured by bench/soak.py), least recently used first out, and frees none
# when a tab closes: its default of 10,000 lets a stream of new visitors grow the app by ~2 GB. An open
# page polls every second, so it stays among the newest; only pages idle the longest are forgotten
# (their next request starts from the page's defaults).
MAX_SESSIONS = 500


@dataclass
class Services:
    """Everything the tabs share; tests build their own with a temporary runs_dir."""

    runs_dir: Path
    hardware: Hardware
    space: SpaceInfo
    toy: ToyModel
    jobs: JobManager
    paths: LocalPaths
    runs: RunSpace
    pipelines: PipelineCache = field(default_factory=PipelineCache)

    @classmethod
    def create(
        cls,
        runs_dir: Path | None = None,
        train_fn: TrainFn | None = None,
        toy_dir: Path = TOY_MODEL_DIR,
        hardware: Hardware | None = None,
        space: SpaceInfo | None = None,
        gpu_mode: GpuMode | None = None,
    ) -> Services:
        """The services of this machine; tests pass their own hardware and toy model folder. Trainings
        run in child processes (`train_fn`: in this process instead); with several GPUs, `gpu_mode`
        (default: $DREAMBOOTH_GPU_MODE, else per_gpu) runs one queued job per GPU or one on all."""
        space = space or detect_space()
        hardware = hardware or detect_hardware()
        runs_dir = Path(runs_dir) if runs_dir else default_runs_dir(space)
        mode = gpu_mode or os.environ.get(GPU_MODE_ENV, "per_gpu")
        jobs = JobManager(train_fn, jobs_dir=runs_dir / JOBS_DIR, gpu_count=None if hardware.device == "cuda" else 0,
                          gpu_mode=mode)
        paths = LocalPaths([toy_dir])
        return cls(runs_dir=runs_dir, hardware=hardware, space=space, toy=ToyModel(toy_dir), jobs=jobs, paths=paths,
                   runs=RunSpace(runs_dir, paths))

    def set_private(self, private: bool, **caps: float | int | None) -> None:
        """A private app (see app.runs_privately) lets its user cancel any training and name any folder;
        one served beyond this machine confines both to each visitor's own, and caps what each visitor may
        ask of it (space.fair_use: `caps` by FairUse field, None for the shared default; a private app
        has only the caps given). A shared app keeps each visitor's runs apart (space.visitors)."""
        self.jobs.private = private
        self.paths.confined = not private
        self.runs.shared = not private
        self.jobs.limits.set(FairUse(**caps) if private else FairUse.shared(**caps))


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
                train = build_train_tab(TrainDeps(s.jobs, s.runs_dir, s.toy, s.hardware, s.runs))
            with gr.Tab("Generate", id="generate"):
                gen = build_generate_tab(GenerateDeps(s.jobs, s.runs_dir, s.toy, s.hardware, s.pipelines, s.runs))
            with gr.Tab("Publish", id="publish"):
                publish = build_publish_tab(s.runs, s.jobs)

        # Cross-tab wiring: a finished training becomes the Generate tab's model.
        train.finished_run.change(
            gen.show_run, train.finished_run, [gen.model, gen.prompt], api_visibility="private", show_progress="hidden"
        )
        train.finished_run.change(publish.refresh, None, publish.run, api_visibility="private", show_progress="hidden")
        # Each visitor's own runs, filled in when their page opens (the page's config lists none).
        app.load(gen.refresh, None, gen.model, api_visibility="private", show_progress="hidden")
        app.load(publish.refresh, None, publish.run, api_visibility="private", show_progress="hidden")
        app.load(**train.poll)  # a page opened during a training shows it now, not a timer tick later
    return app


def app_kwargs() -> dict:
    """For `Blocks.launch(app_kwargs=...)`: the login page scrubbed (space.login_page), the visitor cookie
    (space.visitors), file refusals without paths (space.run_actions); a new dict each time, as gradio adds to
    the one it gets."""
    kwargs = login_page.app_kwargs()
    kwargs["middleware"] += [Middleware(VisitorCookie), Middleware(PlainFileRefusal)]
    return kwargs
