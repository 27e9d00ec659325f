"""Every bad input gets a message naming the field or file, and nothing already done is lost."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from train_helpers import tiny_config

from trainer import ConfigError, TrainConfig, train
from trainer.data.photos import ImageDataError
from trainer.events import WarningEvent
from trainer.models import ModelLoadError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pretrained_model": ""}, "`pretrained_model` is required"),
        ({"instance_prompt": "a photo of a square"}, "`instance_prompt` must contain the identifier 'sks'"),
        ({"identifier": "two words"}, "`identifier` must be one word"),
        ({"with_prior_preservation": True, "class_prompt": ""}, "`class_prompt` is required with prior preservation"),
        ({"with_prior_preservation": True, "class_prompt": "a sks square"}, "`class_prompt` must not contain"),
        ({"resolution": 500}, "`resolution` must be a positive multiple of 8, got 500"),
        ({"max_train_steps": 0}, "`max_train_steps` must be at least 1, got 0"),
        ({"learning_rate": 0.0}, "`learning_rate` must be > 0"),
        ({"text_encoder_steps_fraction": 1.5}, "`text_encoder_steps_fraction` must be in (0, 1]"),
        ({"method": "dora"}, "`method` must be one of full, lora, got 'dora'"),
        ({"mixed_precision": "fp16"}, "`mixed_precision` fp16 needs a CUDA GPU"),
        ({"report_to": "wandb"}, "`report_to` wandb needs the wandb package"),
        ({"resume_from_checkpoint": "/nowhere/checkpoint-1"}, "`resume_from_checkpoint`: /nowhere/checkpoint-1 is not"),
    ],
)
def test_config_errors_name_the_field(tiny_model_dir, subject_images, tmp_path, changes, message):
    if changes.get("report_to") == "wandb" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here, so it is not refused")
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", **changes)
    with pytest.raises(ConfigError) as info:
        train(config)
    assert message in str(info.value)
    assert not (tmp_path / "run").exists(), "a refused run must not leave a run folder"


def test_prompt_over_77_tokens_is_refused(tiny_model_dir, subject_images, tmp_path):
    long_prompt = "a photo of sks square " + "with many details " * 30
    with pytest.raises(ConfigError, match=r"`instance_prompt` is \d+ tokens long; the text encoder reads at most 77"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", instance_prompt=long_prompt))
    assert not (tmp_path / "run").exists()


def test_identifier_warnings(tiny_model_dir, subject_images, tmp_path):
    events: list = []
    train(tiny_config(tiny_model_dir, subject_images, tmp_path / "a", identifier="dog",
                      instance_prompt="a photo of dog square", max_train_steps=1), on_event=events.append)
    train(tiny_config(tiny_model_dir, subject_images, tmp_path / "b", identifier="qxzvbkwpj",
                      instance_prompt="a photo of qxzvbkwpj square", max_train_steps=1), on_event=events.append)
    warnings = [e.message for e in events if isinstance(e, WarningEvent)]
    assert any("'dog' is a common word" in w for w in warnings)
    assert any("'qxzvbkwpj' splits into" in w for w in warnings)


def test_bad_images_are_all_reported_before_anything_loads(tiny_model_dir, subject_images, tmp_path):
    (subject_images / "empty.png").write_bytes(b"")
    (subject_images / "notes.jpg").write_text("not an image")
    Image.new("RGB", (40, 30), "blue").save(subject_images / "tiny.png")
    with pytest.raises(ImageDataError) as info:
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run"))
    text = str(info.value)
    for name in ("empty.png", "notes.jpg", "tiny.png"):
        assert name in text
    assert "subject_0.png" not in text
    assert not (tmp_path / "run").exists()


def test_missing_base_model_names_the_field(subject_images, tmp_path):
    config = tiny_config(tmp_path / "no-model", subject_images, tmp_path / "run")
    with pytest.raises(ModelLoadError, match="`pretrained_model`: could not load .*no-model.*no such folder"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("part", ["unet", "tokenizer", "text_encoder"])
def test_a_folder_without_a_part_names_the_part(tiny_model_dir, subject_images, tmp_path, part):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / part)
    with pytest.raises(ModelLoadError, match=f"`pretrained_model`: could not load the {part} of .*no {part}/ folder"):
        train(tiny_config(broken, subject_images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_a_part_whose_weights_do_not_match_its_config_is_named(tiny_model_dir, subject_images, tmp_path, part):
    """Weights of other shapes than the part's config.json: a clear error naming the part, not a traceback."""
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config_file = broken / part / "config.json"
    config = json.loads(config_file.read_text())
    key = "cross_attention_dim" if part == "unet" else "intermediate_size"
    config[key] = config[key] * 2
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"`pretrained_model`: could not load the {part} of "):
        train(tiny_config(broken, subject_images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(tiny_model_dir, subject_images, tmp_path):
    first = train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", max_train_steps=1))
    before = {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds a run; resume it"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", max_train_steps=2))
    assert {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()} == before


def test_cli_help_documents_every_option_with_its_default():
    out = subprocess.run([sys.executable, "-m", "trainer", "train", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "(default: 'lora')" in out and "(default: 400)" in out


def test_cli_trains_from_a_config_file_and_repeats_from_the_run_folder(tiny_model_dir, subject_images, tmp_path):
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", max_train_steps=2)
    config.save(tmp_path / "run.json")
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(tmp_path / "run.json")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "completed: 2/2 steps" in done.stdout

    # The run folder's config.json repeats the run; flags override it.
    again = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(tmp_path / "run" / "config.json"),
                            "--output-dir", str(tmp_path / "again")], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert TrainConfig.load(tmp_path / "again" / "config.json") == config.replace(output_dir=str(tmp_path / "again"))

    bad = subprocess.run(cmd[:-2] + ["--config", str(tmp_path / "run.json"), "--output-dir", str(tmp_path / "x"),
                                     "--resolution", "30"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "`resolution` must be a positive multiple of 8, got 30" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bad_caption_files_are_all_reported_before_anything_loads(tiny_model_dir, subject_images, tmp_path):
    (subject_images / "subject_0.txt").write_text("a photo of a square on a beach")  # no identifier
    (subject_images / "subject_1.txt").write_text("  \n")
    (subject_images / "subject_2.txt").write_bytes(b"\xff\xfe a photo of sks \x80")
    (subject_images / "subject_3.txt").write_text("a photo of sks square at night")  # fine
    stray = tmp_path / "elsewhere" / "nobody.txt"
    stray.parent.mkdir()
    stray.write_text("a photo of sks square")
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run",
                         instance_data=(str(subject_images), str(stray)))
    with pytest.raises(ImageDataError) as info:
        train(config)
    lines = str(info.value).splitlines()
    assert lines == [
        "nobody.txt: caption file matches no image (expected an image named nobody.*)",
        "subject_0.txt: caption 'a photo of a square on a beach' does not contain the identifier 'sks' as a word",
        "subject_1.txt: caption is empty; delete it to use the instance prompt",
        "subject_2.txt: caption is not UTF-8 text",
    ]
    assert not (tmp_path / "run").exists()


def test_a_caption_over_77_tokens_names_its_image(tiny_model_dir, subject_images, tmp_path):
    (subject_images / "subject_2.txt").write_text("a photo of sks square " + "with many details " * 30)
    with pytest.raises(ConfigError, match=r"`instance_data` caption of `subject_2.png` is \d+ tokens long"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_only_caption_files_is_refused(tiny_model_dir, subject_images, tmp_path):
    caption = subject_images / "subject_0.txt"
    caption.write_text("a photo of sks square")
    with pytest.raises(ImageDataError, match="`instance_data`: only caption files were given, no images"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", instance_data=(str(caption),)))


def test_a_separate_vae_is_used_and_a_wrong_one_refused(tiny_full_base, subject_images, tmp_path):
    import json
    import shutil

    import torch
    from diffusers import AutoencoderKL

    from trainer.models import load_components

    # A VAE of the right shape with other weights: the run encodes with it and a full run ships it.
    tiny_base = tiny_full_base
    vae = AutoencoderKL.from_pretrained(tiny_base.path / "vae")
    with torch.no_grad():
        for param in vae.parameters():
            param.mul_(0.5)
    vae.save_pretrained(tmp_path / "other-vae")
    config = tiny_config(tiny_base.path, subject_images, tmp_path / "run", method="full", max_train_steps=1,
                         pretrained_vae=str(tmp_path / "other-vae"))
    assert torch.equal(load_components(config).vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    result = train(config)
    saved = AutoencoderKL.from_pretrained(result.run_dir / "vae")
    assert torch.equal(saved.encoder.conv_in.weight, vae.encoder.conv_in.weight)

    # A VAE whose latents the denoiser cannot take is refused, naming the field, before training.
    wrong = tmp_path / "wrong-vae"
    shutil.copytree(tmp_path / "other-vae", wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "latent_channels": 16}))
    bad = config.replace(output_dir=str(tmp_path / "bad"), pretrained_vae=str(wrong))
    with pytest.raises(ModelLoadError, match="`pretrained_vae`: .*16-channel latents; this .* model takes 4"):
        train(bad)
    assert not (tmp_path / "bad").exists()
    (wrong / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(ModelLoadError, match="`pretrained_vae`: .*AutoencoderTiny, not an AutoencoderKL"):
        train(bad)
    with pytest.raises(ModelLoadError, match="`pretrained_vae`: .*could not be loaded"):
        train(bad.replace(pretrained_vae=str(tmp_path / "nowhere")))


def test_sdxl_under_half_its_native_resolution_is_refused(tiny_sdxl_model_dir, subject_images, tmp_path):
    # The tiny SDXL's native size is 32 px (16x16 latents behind a 2x VAE): 16 is the floor, as 512 is
    # for SDXL base 1.0's 1024.
    config = tiny_config(tiny_sdxl_model_dir, subject_images, tmp_path / "run", resolution=8)
    with pytest.raises(ConfigError, match="`resolution` 8 is under 16, half of this SDXL model's native 32 px"):
        train(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="`resolution` must be a positive multiple of 8, got 20"):
        train(config.replace(resolution=20))
    assert train(config.replace(resolution=16, max_train_steps=1)).status == "completed"
