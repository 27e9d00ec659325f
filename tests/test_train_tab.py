"""space/train_tab.py's handlers, without a server: the base model and memory lines, the poll, and the
publish request Start checks before any training."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr
import pytest
from ui_fixtures import CPU, GPU16, SDXL_BASE, SECRET, fake_train, form_values, memory_form

from space import texts
from space.hardware import Hardware
from space.jobs import JobManager
from space.presets import TOY_MODEL, ToyModel
from space.train_tab import (
    BASE_MODEL_FIELDS,
    MEMORY_FIELDS,
    PollState,
    TrainDeps,
    cancel_training,
    memory_hint,
    on_base_model,
    on_preset,
    poll,
    publish_request,
    repo_suggestion,
    start_training,
)
from trainer.config import TrainConfig
from trainer.publish.hub import HubError, check_repo_id


def test_the_train_tabs_base_model_and_memory_handlers(tmp_path: Path) -> None:
    deps = TrainDeps(JobManager(), tmp_path, ToyModel(), GPU16)
    *fields, kind, why = on_base_model(deps, SDXL_BASE, "sd")
    assert kind == "sdxl" and dict(zip(BASE_MODEL_FIELDS, fields, strict=True))["resolution"] == 1024
    assert why["visible"] and "Picked for your GPU" in why["value"]
    skipped = on_base_model(deps, "nobody/unknown-model", "sd")
    assert all(isinstance(value, type(gr.skip())) for value in skipped)
    _steps, lr, text_encoder, _fraction = on_preset(deps, None, "object", "full", SDXL_BASE)
    assert lr == 5e-6 and text_encoder is True  # LoRA with the text encoders fits 16 GB: the preset's stays
    small = TrainDeps(JobManager(), tmp_path, ToyModel(), Hardware("cuda", "8 GB card", 7.4))
    assert on_preset(small, None, "object", "lora", SDXL_BASE)[2] is False  # there it does not: frozen
    assert on_preset(deps, None, "object", "full", TOY_MODEL)[2] is True  # the toy model: as the preset says
    line = memory_hint(deps, *(memory_form(SDXL_BASE, method="full", gradient_checkpointing=False, cache_latents=True,
                                            gradient_accumulation_steps=1, sample_batch_size=4, score_checkpoints=True)[key]
                               for key in MEMORY_FIELDS))
    assert line["visible"] and "Does not fit your GPU" in line["value"]


def test_the_train_tabs_poll_redraws_only_what_changed(tmp_path: Path) -> None:
    release = threading.Event()
    deps = TrainDeps(JobManager(fake_train(release)), tmp_path, ToyModel(), CPU)
    idle, status, *_ = poll(deps, PollState())
    assert idle == PollState(0, 0, 0, 0) and "No training yet" in status
    assert all(isinstance(value, type(gr.skip())) for value in poll(deps, idle))  # nothing changed
    assert cancel_training(deps) == texts.NOTHING_TO_CANCEL

    deps.jobs.start(TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=50, instance_prompt="sks"))
    running, status, plot, samples, warnings, finished, _, *_ = poll(deps, idle)
    assert running.job_id == 1 and "step" in status and warnings == {"__type__": "update", "value": "careful",
                                                                      "visible": True}
    assert plot["visible"] and len(plot["value"]) == 2  # the first step: its loss and the moving average
    assert samples["value"] == [] and not samples["visible"]  # a new job: its samples redrawn, none yet: hidden
    assert isinstance(finished, type(gr.skip()))
    assert cancel_training(deps) == "Cancelling at the next step…"
    release.set()
    deps.jobs.wait(10)
    done, status, _, samples, warnings, finished, _, *_ = poll(deps, running)
    assert "Cancelled" in status and isinstance(warnings, type(gr.skip()))
    assert [(image.size, caption) for image, caption in samples["value"]] == [((8, 8), "step 1")]  # images
    assert samples["visible"]
    assert finished == "run"  # the run by name, for the Generate and Publish lists


def test_publish_request_needs_a_name_and_a_token_before_asking_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert publish_request({"publish_to_hub": False, "hub_token": SECRET}, None) is None
    with pytest.raises(HubError, match="repo name to publish to is missing"):
        publish_request({"publish_to_hub": True, "hub_repo": " "}, None)
    with pytest.raises(HubError, match="Invalid repo id 'bad--name'"):
        publish_request({"publish_to_hub": True, "hub_repo": "bad--name", "hub_token": SECRET}, None)
    with pytest.raises(HubError, match="No Hugging Face token found"):
        publish_request({"publish_to_hub": True, "hub_repo": "sks-dog", "hub_token": ""}, None)
    assert repo_suggestion("zwx", "dog") == "zwx-dog-dreambooth"
    assert repo_suggestion("zwx", "toy car", "alice") == "alice/zwx-toy-car-dreambooth"


@pytest.mark.parametrize("name", ["sks-dog.git", "alice/sks-dog.git", "sks-dog.ipynb"])
def test_start_refuses_a_repo_id_the_hub_refuses_in_hubs_words(
    tmp_path: Path, four_images: list[str], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start checks the repo name with trainer.publish.hub.check_repo_id, before the token and before any
    training: a name ending in .git or .ipynb is refused with the message the Publish tab gives."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError) as hub:
        check_repo_id(name)
    with pytest.raises(HubError) as refused:
        publish_request({"publish_to_hub": True, "hub_repo": name, "hub_token": SECRET}, None)
    assert str(refused.value) == str(hub.value) and "Invalid repo id" in str(hub.value)

    deps = TrainDeps(JobManager(fake_train(threading.Event())), tmp_path, ToyModel(), CPU)
    publish = {"publish_to_hub": True, "hub_repo": name, "hub_private": True, "hub_token": SECRET}
    with pytest.raises(gr.Error) as start:
        start_training(deps, **form_values(four_images), **publish)
    assert start.value.message == str(hub.value) and SECRET not in start.value.message
    assert deps.jobs.snapshot().state == "idle"  # nothing queued, nothing trained


def test_the_loss_plot_shows_each_step_and_a_debiased_moving_average() -> None:
    from space.train_tab import loss_frame

    noisy = tuple((step, 0.3 + (0.2 if step % 2 else -0.2)) for step in range(1, 101))
    frame = loss_frame(noisy)
    raw, smooth = (frame[frame["series"] == name]["loss"].to_numpy() for name in (texts.LOSS_RAW, texts.LOSS_SMOOTHED))
    assert len(raw) == len(smooth) == 100 and raw[0] == smooth[0]  # debiased: it starts where the loss starts
    assert abs(smooth[-1] - 0.3) < 0.02 and smooth[50:].std() < 0.1 * raw[50:].std()  # the noise averaged away
    assert len(loss_frame(tuple((s, 1.0) for s in range(5000)))) <= 2 * 500 + 2  # a long run: every k-th step


def test_samples_reach_the_page_as_images_captioned_with_their_step_and_prompt(tmp_path: Path) -> None:
    from PIL import Image

    from space.run_actions import sample_gallery
    from trainer.config import TrainConfig
    from trainer.run_folder import sample_path, write_config

    write_config(tmp_path, TrainConfig(validation_prompts=("a photo of zwx dog", "zwx dog on the moon")))
    paths = [sample_path(tmp_path, step, prompt, 0) for step in (100, 200) for prompt in (0, 1)]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    shown = sample_gallery([str(p) for p in paths] + [str(tmp_path / "samples" / "gone.png")])
    assert [caption for _, caption in shown] == ["step 100 · a photo of zwx dog", "step 100 · zwx dog on the moon",
                                                 "step 200 · a photo of zwx dog", "step 200 · zwx dog on the moon"]
    assert all(isinstance(image, Image.Image) for image, _ in shown)


def test_the_picked_steps_samples_come_first_beside_the_last_steps(tmp_path: Path) -> None:
    """Once the run has ended: what the scorer drew at the picked step (its pick's evidence), that step's samples,
    then the last step's, then the rest."""
    from PIL import Image

    from space.run_actions import sample_gallery
    from trainer.config import TrainConfig
    from trainer.run_folder import sample_path, scored_image_path, write_config

    write_config(tmp_path, TrainConfig(instance_prompt="a photo of zwx dog"))
    paths = [sample_path(tmp_path, step, 0, 0) for step in (200, 400, 600, 800)]
    for path in [*paths, scored_image_path(tmp_path, 400, 0), scored_image_path(tmp_path, 800, 0)]:
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    shown = [caption for _, caption in sample_gallery([str(p) for p in paths], picked=400)]
    assert shown == ["step 400 (picked), as scored · a photo of zwx dog", "step 400 (picked)", "step 800", "step 200",
                     "step 600"]
    assert [caption for _, caption in sample_gallery([str(p) for p in paths])] == [
        "step 200", "step 400", "step 600", "step 800"]  # still training: in order, no pick
