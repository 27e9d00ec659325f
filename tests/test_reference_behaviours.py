"""What people who come from diffusers' DreamBooth scripts expect of a run, asked of our CLI.

diffusers tests its scripts in examples/dreambooth/test_dreambooth*.py: weights files and their
keys, checkpoint folders, resuming, the checkpoint limit, captions. Each of those tests is listed
here with the test of ours that asks the same of `python -m trainer train` (run in this process
through `run_cli`, on the tiny models at 32 px), an existing test that already does, or why it
does not apply. Our own spellings differ where the table says so: checkpoints live in
`checkpoints/checkpoint-000004` (a resume may still name one `checkpoint-4`), and at most 2 are kept
unless told otherwise (diffusers keeps all).

test_dreambooth.py (full fine-tuning)
  test_dreambooth ............................ test_a_full_run_checkpoints_and_resumes_from_a_checkpoint_by_name
                                               (unet/ weights, scheduler config, plain diffusers samples from it)
  test_dreambooth_checkpointing .............. the same test: checkpoint-2 and -4; the intermediate one's UNet
                                               samples; resume from `checkpoint-4` to 6 adds checkpoint-6 only
  test_dreambooth_checkpointing_checkpoints_total_limit
                                               test_with_a_total_limit_the_newest_checkpoints_stay_and_the_lora_loads
                                               and test_engine_units::test_only_the_last_k_checkpoints_are_kept
  ..._total_limit_removes_multiple_checkpoints test_a_lower_total_limit_on_resume_removes_every_older_checkpoint
  test_dreambooth_if ......................... n.a.: DeepFloyd IF is not trained; refused by
                                               test_families_we_do_not_train_are_refused_by_the_cli
test_dreambooth_lora.py
  test_dreambooth_lora ....................... test_the_lora_file_holds_exactly_the_parts_trained[sd-unet]
  test_dreambooth_lora_with_text_encoder ..... test_the_lora_file_holds_exactly_the_parts_trained[sd-unet+text]
  test_dreambooth_lora_checkpointing_checkpoints_total_limit
                                               test_with_a_total_limit_the_newest_checkpoints_stay_and_the_lora_loads[sd]
  ..._total_limit_removes_multiple_checkpoints test_a_lower_total_limit_on_resume_removes_every_older_checkpoint
                                               (the method does not matter to checkpoints: one test for both)
  test_dreambooth_lora_if_model .............. n.a.: DeepFloyd IF (see above); its flags (precomputed text
                                               embeddings, attention mask) are IF's. Ours caches the prompt
                                               embeddings by itself while the text encoder is frozen.
  test_dreambooth_lora_sdxl .................. test_the_lora_file_holds_exactly_the_parts_trained[sdxl-unet]
  test_dreambooth_lora_sdxl_with_text_encoder  test_the_lora_file_holds_exactly_the_parts_trained[sdxl-unet+text]
                                               (stricter: both text encoders' layers must be there)
  test_dreambooth_lora_sdxl_custom_captions .. test_caption_files_give_sdxl_images_their_own_prompts[unet]
  test_dreambooth_lora_sdxl_text_encoder_custom_captions
                                               test_caption_files_give_sdxl_images_their_own_prompts[unet+text].
                                               Ours reads a caption file beside each image (kohya's way), not a
                                               dataset's caption column; captions reaching each row is
                                               test_engine_units::test_each_image_trains_with_its_own_caption
  test_dreambooth_lora_sdxl_checkpointing_checkpoints_total_limit
  test_dreambooth_lora_sdxl_text_encoder_checkpointing_checkpoints_total_limit
                                               test_with_a_total_limit_the_newest_checkpoints_stay_and_the_lora_loads[sdxl]
                                               (7 steps: the output is step 7's, the checkpoints 4 and 6)
test_dreambooth_lora_edm.py
  test_dreambooth_lora_sdxl_with_edm ......... n.a.: no EDM-style training. An EDM base used to train silently
  test_dreambooth_lora_playground              with DDPM noise (a wrong target); it is now refused:
                                               test_an_edm_style_base_is_refused_before_anything_is_written
test_dreambooth_flux, _lora_flux, _lora_flux2, _lora_flux2_klein, _lora_flux_kontext, _lora_hidream,
_lora_lumina2, _lora_qwenimage, _lora_sana, _sd3, _lora_sd3
  every test ................................. n.a.: families we do not train (refused by the CLI:
                                               test_families_we_do_not_train_are_refused_by_the_cli). What their
                                               tests ask beyond the family:
    *_checkpoints_total_limit*                 as for SD above
    test_dreambooth_lora_with_metadata         test_the_lora_file_holds_exactly_the_parts_trained (rank 4, alpha 8)
    test_dreambooth_lora_latent_caching        latents are cached by default: every LoRA run here caches them
    test_dreambooth_lora_layers / _block / _layer
                                               n.a.: the LoRA's target layers are fixed (no such option)
    *_aspect_ratio_buckets, *_caption_dropout  n.a.: no such options (diffusers skips those tests too)

Not in diffusers' tests, but in their scripts' flags (--validation_prompt, --validation_steps):
  test_validation_samples_are_drawn_at_every_validation_step_for_each_prompt_and_seed
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from cli_helpers import run_cli

from trainer.data.batches import BatchSource
from trainer.run_folder import LORA_WEIGHTS, read_status

PROMPT = "a photo of sks square"
# The tiny model at 32 px, fast on a CPU: no gradient checkpointing, torch's AdamW, 2-step samples.
FAST = ("--instance-prompt", PROMPT, "--resolution", "32", "--report-to", "none", "--no-gradient-checkpointing",
        "--no-use-8bit-adam", "--validation-inference-steps", "2")


def train_cli(model: Path, images: Path, run: Path, *flags: str) -> None:
    """`python -m trainer train` on a tiny model; a failure shows the CLI's stderr."""
    status, stderr = run_cli(["train", "--pretrained-model", str(model), "--instance-data", str(images),
                              "--output-dir", str(run), *FAST, *flags])
    assert status == 0, stderr[-3000:]


def resume_cli(run: Path, *flags: str) -> tuple[int, str]:
    """Train a run on from its own config.json (as the README shows), with `flags` changed."""
    return run_cli(["train", "--config", str(run / "config.json"), *flags])


def checkpoint_steps(run: Path) -> set[int]:
    """The steps of the run's checkpoints; anything else in checkpoints/ (a leftover) fails the test."""
    names = [p.name for p in (run / "checkpoints").iterdir()]
    assert all(re.fullmatch(r"checkpoint-\d{6}", name) for name in names), names
    return {int(name.removeprefix("checkpoint-")) for name in names}


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def samples_an_image(pipe) -> None:
    image = pipe(PROMPT, num_inference_steps=1, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()


# --- outputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("text_encoder", [False, True], ids=["denoiser", "denoiser+text"])
def test_the_lora_file_holds_exactly_the_parts_trained(tiny_base, subject_images, tmp_path, text_encoder):
    """Only LoRA layers, named by the part they belong to (unet or transformer, the CLIP text encoders: never
    T5); the file also says each part's rank and alpha, so a loader scales it right (alpha 8 is not the rank 4)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    run = tmp_path / "run"
    train_cli(tiny_base.path, subject_images, run, "--max-train-steps", "2", "--lora-rank", "4", "--lora-alpha", "8",
              "--train-text-encoder" if text_encoder else "--no-train-text-encoder")

    with safe_open(run / LORA_WEIGHTS, framework="pt") as weights:
        keys, metadata = list(weights.keys()), weights.metadata()
    assert keys and all("lora" in key for key in keys)
    parts = {tiny_base.denoiser, *(tiny_base.trainable if text_encoder else ())}
    assert {key.split(".", 1)[0] for key in keys} == parts
    adapters = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
    assert {part: (adapters[f"{part}.r"], adapters[f"{part}.lora_alpha"]) for part in parts} == dict.fromkeys(
        parts, (4, 8))


# --- checkpoints and resuming ---------------------------------------------------------------
def test_a_full_run_checkpoints_and_resumes_from_a_checkpoint_by_name(tiny_model_dir, subject_images, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    run = tmp_path / "run"
    train_cli(tiny_model_dir, subject_images, run, "--method", "full", "--max-train-steps", "4",
              "--checkpointing-steps", "2")
    # The output is a pipeline folder that plain diffusers loads and samples from.
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "scheduler" / "scheduler_config.json").is_file()
    samples_an_image(DiffusionPipeline.from_pretrained(run))
    assert checkpoint_steps(run) == {2, 4}
    # A full run's checkpoint holds the whole UNet: it loads over the base's (strictly) and samples.
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.load_state_dict(load_file(run / "checkpoints" / "checkpoint-000002" / "unet.safetensors"))
    samples_an_image(DiffusionPipeline.from_pretrained(tiny_model_dir, unet=unet))

    shutil.rmtree(run / "checkpoints" / "checkpoint-000002")  # so that only what the resume adds is new
    status, stderr = resume_cli(run, "--max-train-steps", "6", "--resume-from-checkpoint", "checkpoint-3")
    assert status == 2 and "one of this run's checkpoints (checkpoint-000004)" in stderr, stderr[-3000:]
    # diffusers' spelling: the step without zeros, relative to the run folder.
    status, stderr = resume_cli(run, "--max-train-steps", "6", "--resume-from-checkpoint", "checkpoint-4")
    assert status == 0, stderr[-3000:]

    assert checkpoint_steps(run) == {4, 6}
    assert read_status(run)["step"] == 6 and metric_steps(run) == [1, 2, 3, 4, 5, 6]
    samples_an_image(DiffusionPipeline.from_pretrained(run))


def test_with_a_total_limit_the_newest_checkpoints_stay_and_the_lora_loads(tiny_base, subject_images, tmp_path):
    run = tmp_path / "run"
    train_cli(tiny_base.path, subject_images, run, "--train-text-encoder", "--max-train-steps", "7",
              "--checkpointing-steps", "2", "--checkpoints-total-limit", "2")
    # Checkpoint 2 made way for 6; the last step, 7, is no checkpoint step, but its weights are the output.
    assert checkpoint_steps(run) == {4, 6} and read_status(run)["step"] == 7
    pipe = tiny_base.pipeline_class.from_pretrained(tiny_base.path)
    pipe.load_lora_weights(run)
    samples_an_image(pipe)


def test_a_lower_total_limit_on_resume_removes_every_older_checkpoint(tiny_model_dir, subject_images, tmp_path):
    keep_all = tmp_path / "keep-all.json"  # no limit can only be said in a config file (null)
    keep_all.write_text(json.dumps({"checkpoints_total_limit": None}))
    run = tmp_path / "run"
    train_cli(tiny_model_dir, subject_images, run, "--config", str(keep_all), "--max-train-steps", "6",
              "--checkpointing-steps", "2")
    assert checkpoint_steps(run) == {2, 4, 6}

    status, stderr = resume_cli(run, "--resume-from-checkpoint", "latest", "--max-train-steps", "8",
                                "--checkpoints-total-limit", "1")
    assert status == 0, stderr[-3000:]
    assert checkpoint_steps(run) == {8}  # three removed by the one save
    assert metric_steps(run) == list(range(1, 9))


# --- data and samples -----------------------------------------------------------------------
@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+text"])
def test_caption_files_give_sdxl_images_their_own_prompts(tiny_sdxl_model_dir, subject_images, tmp_path,
                                                          text_encoder):
    (subject_images / "subject_1.txt").write_text("a photo of sks square on a beach\n")
    (subject_images / "subject_3.txt").write_text("a photo of sks square at night")
    # A spy on the batches: the real BatchSource, with the prompts it was given kept.
    with mock.patch("trainer.loop.BatchSource", wraps=BatchSource) as batches:
        train_cli(tiny_sdxl_model_dir, subject_images, tmp_path / "run", "--max-train-steps", "2",
                  "--train-text-encoder" if text_encoder else "--no-train-text-encoder")
    assert batches.call_args.kwargs["instance_prompts"] == [
        PROMPT, "a photo of sks square on a beach", PROMPT, "a photo of sks square at night"]
    assert (tmp_path / "run" / LORA_WEIGHTS).is_file()


def test_validation_samples_are_drawn_at_every_validation_step_for_each_prompt_and_seed(
        tiny_model_dir, subject_images, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    train_cli(tiny_model_dir, subject_images, run, "--max-train-steps", "4", "--validation-steps", "2",
              "--num-validation-images", "2", "--validation-prompts", PROMPT, "a sks square on grass")
    names = sorted(p.name for p in (run / "samples").iterdir())
    assert names == [f"step-{step:06d}-p{prompt}-{i}.png" for step in (2, 4) for prompt in (0, 1) for i in (0, 1)]
    assert {Image.open(run / "samples" / name).size for name in names} == {(32, 32)}


# --- bases we do not train ------------------------------------------------------------------
def test_an_edm_style_base_is_refused_before_anything_is_written(tiny_sdxl_model_dir, subject_images, tmp_path):
    """A Playground v2.5-like base: an SDXL pipeline whose scheduler is EDM's. Trained with DDPM noise it
    would learn the wrong target without a word; it is refused instead, naming the scheduler."""
    from diffusers import EDMDPMSolverMultistepScheduler

    model = tmp_path / "edm-sdxl"
    shutil.copytree(tiny_sdxl_model_dir, model, ignore=shutil.ignore_patterns("scheduler"))
    EDMDPMSolverMultistepScheduler().save_pretrained(model / "scheduler")
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EDMDPMSolverMultistepScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))

    status, stderr = run_cli(["train", "--pretrained-model", str(model), "--instance-data", str(subject_images),
                              "--output-dir", str(tmp_path / "run"), *FAST])
    assert status == 2, stderr[-3000:]
    assert stderr.startswith("error: `pretrained_model`:") and "EDM-style model" in stderr
    assert "EDMDPMSolverMultistepScheduler" in stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("pipeline", ["IFPipeline", "Flux2Pipeline", "Flux2KleinPipeline", "FluxKontextPipeline",
                                      "FluxFillPipeline", "HiDreamImagePipeline", "Lumina2Pipeline",
                                      "QwenImagePipeline", "SanaPipeline", "StableDiffusion3InpaintPipeline"])
def test_families_we_do_not_train_are_refused_by_the_cli(pipeline, subject_images, tmp_path):
    """The families of diffusers' other DreamBooth tests: refused with exit status 2, naming the pipeline."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"}))
    status, stderr = run_cli(["train", "--pretrained-model", str(model), "--instance-data", str(subject_images),
                              "--output-dir", str(tmp_path / "run"), *FAST])
    assert status == 2 and stderr.startswith("error: `pretrained_model`:") and pipeline in stderr, stderr[-3000:]
    assert not (tmp_path / "run").exists()


# --- limits the app and the CLI share ---------------------------------------------------------------
@pytest.mark.parametrize("n_photos", [1, 3, 21])
def test_the_engine_says_what_it_does_with_fewer_or_more_photos_than_the_app_takes(tiny_model_dir, tmp_path,
                                                                                  n_photos):
    """The app takes 3-20 photos (space/form.py refuses others); the CLI trains on any number and says
    what that means outside the range, in one warning naming the count and the range."""
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(n_photos):  # distinct, so that no duplicate warning joins in
        Image.new("RGB", (64, 64), (10 * i, 255 - 10 * i, 128)).save(photos / f"p{i:02d}.png")
    status, stderr = run_cli(["train", "--pretrained-model", str(tiny_model_dir), "--instance-data", str(photos),
                              "--output-dir", str(tmp_path / "run"), "--max-train-steps", "1", *FAST])
    assert status == 0, stderr[-3000:]
    notes = [line for line in stderr.splitlines() if "DreamBooth is made for 3-20" in line
             or "DreamBooth learns one from 3-20" in line]
    if n_photos == 3:
        assert notes == []
    else:
        assert len(notes) == 1 and f"{n_photos} photo" in notes[0] and "Training on" in notes[0], stderr[-3000:]
