"""space/generate_tab.py's handlers, without a server."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from ui_fixtures import GPU16, SDXL_BASE

from space.generate_tab import GenerateDeps, on_model
from space.jobs import JobManager
from space.presets import TOY_MODEL, ToyModel
from trainer.config import TrainConfig
from trainer.inference import PipelineCache
from trainer.run_folder import write_status
from trainer.toyworld import TOY_RESOLUTION


def test_generate_samples_sdxl_runs_and_repos_at_1024(tmp_path: Path, toy: ToyModel) -> None:
    deps = GenerateDeps(JobManager(), tmp_path, toy, GPU16, PipelineCache())
    runs = {}
    for name, base, family in (("xl", SDXL_BASE, "sdxl"), ("sd", "some/sd-model", "sd"), ("old", "some/sd", None)):
        run = runs[name] = tmp_path / name
        run.mkdir()
        config = TrainConfig(pretrained_model=base, instance_prompt="a photo of sks dog", resolution=768)
        config.save(run / "config.json")
        if family is not None:  # a run from before families records none
            write_status(run, "completed", 1, 1, family=family)
    prompt, width, height, *_ = on_model(deps, str(runs["xl"]))
    assert (prompt, width, height) == ("a photo of sks dog", 1024, 1024)
    assert on_model(deps, SDXL_BASE)[1:3] == (1024, 1024)  # a known Hub id: the table's size
    assert on_model(deps, "stabilityai/stable-diffusion-2-1")[1] == 768
    # SD runs, unknown Hub repos, an old LoRA run (whose family would need the network): size left alone.
    for source in (str(runs["sd"]), str(runs["old"]), "someone/unknown-lora", ""):
        assert isinstance(on_model(deps, source)[1], type(gr.skip())), source
    assert on_model(deps, TOY_MODEL)[1] == TOY_RESOLUTION  # the toy model, as before


def test_a_flux_or_sd3_source_samples_as_its_family_does(tmp_path: Path, toy: ToyModel) -> None:
    """FLUX: guidance 3.5, 28 steps, no negative prompt, its own sampler; SD 3: a negative prompt, guidance 7;
    back on an SD model the negative prompt and the sampler come back, its settings kept."""
    deps = GenerateDeps(JobManager(), tmp_path, toy, GPU16, PipelineCache())
    run = tmp_path / "flux-run"
    run.mkdir()
    TrainConfig(pretrained_model="black-forest-labs/FLUX.1-dev", instance_prompt="a photo of sks dog").save(
        run / "config.json")
    write_status(run, "completed", 1, 1, family="flux")
    _, width, _, _, negative, guidance, steps, sampler = on_model(deps, str(run))
    assert width == 1024 and (guidance, steps) == (3.5, 28)
    assert negative["visible"] is False and sampler["visible"] is False
    *_, negative, guidance, steps, sampler = on_model(deps, "stabilityai/stable-diffusion-3.5-medium")
    assert negative["visible"] is True and sampler["visible"] is False and (guidance, steps) == (7.0, 28)
    assert on_model(deps, "black-forest-labs/FLUX.1-schnell")[6] == 4  # distilled for 4 steps
    *_, negative, guidance, steps, sampler = on_model(deps, SDXL_BASE)
    assert negative["visible"] is True and sampler["visible"] is True
    assert isinstance(guidance, type(gr.skip())) and isinstance(steps, type(gr.skip()))
