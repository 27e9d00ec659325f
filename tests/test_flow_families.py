"""SD 3 and FLUX.1 as a user meets them: a Hub id, the CLI, and a LoRA that plain diffusers loads.

The tiny models (tests/tiny_transformers.py) are put on the fake Hub (tests/hub_server.py) and
downloaded once into a Hub cache; the training then runs offline from that cache, as on a machine
that downloaded the base model before, and its LoRA is loaded by a Python process that only has
diffusers: it never imports this project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import USER, WRITE_TOKEN
from train_helpers import tiny_config

from trainer import train
from trainer.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}

# Run by a bare interpreter in an empty folder: the base from the Hub cache (offline), with and without the LoRA.
_PLAIN_DIFFUSERS = """
import sys, torch, diffusers
pipe = getattr(diffusers, sys.argv[1]).from_pretrained(sys.argv[2])
def draw():
    return pipe("a photo of sks square", num_inference_steps=2, height=32, width=32, output_type="pt",
                max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
plain = draw()
pipe.load_lora_weights(sys.argv[3])
from safetensors import safe_open
with safe_open(sys.argv[3] + "/pytorch_lora_weights.safetensors", "pt") as f:
    in_file = sum(1 for k in f.keys() if k.startswith("transformer."))
loaded = sum(1 for n, _ in pipe.transformer.named_parameters() if "lora_" in n)
print(float((draw() - plain).abs().mean()), in_file == loaded > 0,
      any(m.split(".")[0] in ("trainer", "space") for m in sys.modules))
"""


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_cli_run_on_a_hub_id_loads_in_plain_diffusers(request, hub, subject_images: Path, tmp_path: Path,
                                                        family: str) -> None:
    from huggingface_hub import constants

    repo = _in_the_hub_cache(hub, request.getfixturevalue(f"tiny_{family}_model_dir"), family)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": constants.HF_HUB_CACHE}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "train", "--quiet", "--pretrained-model", repo,
           "--instance-data", str(subject_images), "--identifier", "sks", "--instance-prompt", "a photo of sks square",
           "--output-dir", str(run), "--resolution", "32", "--max-train-steps", "6", "--learning-rate", "1e-2",
           "--max-sequence-length", "16", "--train-text-encoder", "--report-to", "none"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["family"] == family

    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    plain = subprocess.run([sys.executable, "-c", _PLAIN_DIFFUSERS, PIPELINES[family], repo, str(run)], cwd=empty,
                           env=bare, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    change, all_loaded, imported_project = plain.stdout.split()
    assert float(change) > 1e-3 and all_loaded == "True" and imported_project == "False"


def _in_the_hub_cache(hub, folder: Path, family: str) -> str:
    """Put a tiny model on the fake Hub and download it into the test's Hub cache; its repo id."""
    from huggingface_hub import HfApi, snapshot_download

    repo = f"{USER}/tiny-{family}"
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=folder)
    snapshot_download(repo, token=WRITE_TOKEN)  # from now on, offline
    return repo


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_app_trains_a_hub_id_from_the_offline_cache(request, hub, subject_images: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    """The Train form's base model is the Hub id; the training (a subprocess of the app) finds it in the cache
    without the network, and its LoRA loads onto that base in plain diffusers."""
    from gradio_client import Client, handle_file
    from huggingface_hub import constants
    from ui_fixtures import serve_app, train_form

    repo = _in_the_hub_cache(hub, request.getfixturevalue(f"tiny_{family}_model_dir"), family)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", constants.HF_HUB_CACHE)
    images = [handle_file(str(p)) for p in sorted(subject_images.glob("*.png"))]
    with serve_app(tmp_path, request.getfixturevalue("tiny_model_dir")) as (url, services):
        client = Client(url, verbose=False)
        client.predict(images=images, **{**train_form(repo), "learning_rate": 1e-2}, api_name="/train")
        job = services.jobs.wait(300).as_dict()
    assert job["state"] == "completed", job
    run = next((tmp_path / "runs").rglob("pytorch_lora_weights.safetensors")).parent
    assert json.loads((run / "run.json").read_text())["family"] == family

    import diffusers

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(repo)

    def draw():
        return pipe("a photo of sks square", num_inference_steps=2, height=32, width=32, output_type="pt",
                    max_sequence_length=16, generator=torch.Generator().manual_seed(0)).images
    plain = draw()
    pipe.load_lora_weights(run)
    assert (draw() - plain).abs().mean() > 1e-3


@pytest.mark.parametrize(
    ("family", "change", "field", "words"),
    [
        ("flux", {"method": "full"}, "method", "120 GB"),
        ("flux", {"max_sequence_length": 600}, "max_sequence_length", "512"),
        ("sd3", {"snr_gamma": 5.0}, "snr_gamma", "flow matching"),
    ],
)
def test_settings_a_flow_family_cannot_train_are_refused_before_anything_is_written(
    request, subject_images: Path, tmp_path: Path, family: str, change: dict, field: str, words: str
) -> None:
    folder = request.getfixturevalue(f"tiny_{family}_model_dir")
    with pytest.raises(ConfigError, match=words) as err:
        train(tiny_config(folder, subject_images, tmp_path / "run", **change))
    assert err.value.field == field and f"`{field}`" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_lora_on_a_quantized_flux_trains_on_the_cpu_and_loads_onto_the_plain_base(
    tiny_flux_model_dir: Path, subject_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """QLoRA: the transformer's block layers are bitsandbytes 4-/8-bit ones while the fp32 LoRA on them
    trains; the LoRA, loaded onto the unquantized base, has learned the photos."""
    import bitsandbytes as bnb
    from train_helpers import denoising_loss

    import trainer.loop as loop

    seen = {}
    original = loop.load_components

    def watched(config):
        seen["parts"] = original(config)
        return seen["parts"]

    monkeypatch.setattr(loop, "load_components", watched)
    config = tiny_config(tiny_flux_model_dir, subject_images, tmp_path / "run", learning_rate=1e-2, lora_rank=8,
                         max_train_steps=40, train_batch_size=2, quantize_base=kind, max_sequence_length=16)
    result = train(config)

    transformer = seen["parts"].denoiser
    layer = bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt
    quantized = [m for m in transformer.modules() if isinstance(m, layer)]
    assert quantized and all(m.weight.dtype in (torch.uint8, torch.int8) for m in quantized)
    trained = [p for p in transformer.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    t5 = seen["parts"].text_encoders[1]  # the frozen T5 is quantized too: it never trains, and it is the largest
    assert any(isinstance(m, layer) for m in t5.modules()) and not any(p.requires_grad for p in t5.parameters())
    before = denoising_loss(tiny_flux_model_dir, subject_images, "a photo of sks square")
    after = denoising_loss(tiny_flux_model_dir, subject_images, "a photo of sks square", lora_dir=result.run_dir)
    assert after < 0.8 * before, f"loss {before:.4f} -> {after:.4f}"


def test_a_quantized_base_trains_only_a_lora(tiny_flux_model_dir: Path, subject_images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs method lora") as err:
        train(tiny_config(tiny_flux_model_dir, subject_images, tmp_path / "run", method="full", quantize_base="nf4"))
    assert err.value.field == "quantize_base" and not (tmp_path / "run").exists()


def test_text_encoders_nothing_needs_again_are_freed_during_the_steps(
    tiny_flux_model_dir: Path, subject_images: Path, tmp_path: Path
) -> None:
    """Every caption's embedding is cached, then CLIP and T5 hold no memory while the steps run; with samples
    to draw they stay (and draw them)."""
    from trainer.events import PhaseEvent, SampleEvent, StepEvent
    from trainer.memory import parking

    made: list[parking.Parking] = []
    original = parking.Parking.for_run

    def recorded(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    devices: list[set[str]] = []

    def on_event(event) -> None:
        if isinstance(event, StepEvent):
            encoders = made[-1].freed.values() if made[-1] is not None else ()
            devices.append({p.device.type for module in encoders for p in module.parameters()})
        events.append(event)

    events: list = []
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    for i, image in enumerate(sorted(subject_images.glob("*.png"))):
        (captioned / image.name).write_bytes(image.read_bytes())
        (captioned / f"{image.stem}.txt").write_text(f"a photo of sks square, view {i}")
    common = dict(learning_rate=1e-2, max_train_steps=4, max_sequence_length=16, with_prior_preservation=True,
                  class_prompt="a photo of a square", num_class_images=2, class_cache_dir=str(tmp_path / "cc"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parking.Parking, "for_run", recorded)
        train(tiny_config(tiny_flux_model_dir, captioned, tmp_path / "freed", **common), on_event=on_event)
        assert set(made[-1].freed) == {"text_encoder", "text_encoder_2"}
        assert devices == [{"meta"}] * 4  # every step ran with CLIP and T5 gone
        assert any("freed once every prompt is embedded" in e.message for e in events if isinstance(e, PhaseEvent))

        events.clear()
        train(tiny_config(tiny_flux_model_dir, captioned, tmp_path / "sampled", validation_prompts=("a photo of sks square",),
                          validation_steps=2, **common), on_event=on_event)
        assert made[-1] is None or not made[-1].freed
        assert [e.step for e in events if isinstance(e, SampleEvent)] == [2, 4]


def test_a_gated_base_without_access_says_what_to_do(hub, tiny_flux_model_dir: Path, subject_images: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUX.1-dev and SD 3.5 are gated: training from one, or generating with it, without a token that accepted its
    license says to accept it and log in, naming the repo: not a 401 traceback, not "does not exist"."""
    from huggingface_hub import HfApi, constants

    from trainer.families import ModelLoadError
    from trainer.inference import resolve_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    repo = f"{USER}/gated-flux"
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=tiny_flux_model_dir)
    hub.repos[repo].gated = True  # and USER has not accepted its license
    with pytest.raises(ModelLoadError) as err:
        train(tiny_config(repo, subject_images, tmp_path / "run"))
    words = str(err.value)
    assert words.startswith("`pretrained_model`: ") and f"{repo} is gated" in words and "accept its license" in words
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match=f"{repo} is gated: open https://huggingface.co/{repo}"):
        resolve_model(repo, token=WRITE_TOKEN)
    hub.repos[repo].granted.add(USER)  # accepted: the same token now reads it
    assert resolve_model(repo, token=WRITE_TOKEN).kind == "full"


def test_the_memory_command_says_it_does_not_size_flux_yet(tiny_flux_model_dir: Path, subject_images: Path,
                                                           tmp_path: Path) -> None:
    """`python -m trainer memory` on a FLUX model names the families it sizes, not a missing config.json; the
    engine's own check before a GPU training warns with the same words and lets it train."""
    from cli_helpers import run_cli

    from trainer.loop import Run, check_memory

    status, stderr = run_cli(["memory", "--pretrained-model", str(tiny_flux_model_dir)])
    assert status == 1 and "is a FLUX.1 model; the memory model sizes Stable Diffusion 1.x/2.x and" in stderr
    warnings: list[str] = []
    run = Run(tiny_config(tiny_flux_model_dir, subject_images, tmp_path / "run"), lambda event: None, None)
    run.warn = warnings.append
    check_memory(run, torch.device("cuda"))  # the shapes are read before any CUDA call: refused there
    assert len(warnings) == 1 and "Memory not estimated" in warnings[0] and "FLUX.1 model" in warnings[0]
