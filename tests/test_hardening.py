"""Bad input, systematically: a corpus of concrete mistakes, each with the message it must get.

Every entry names the field or file and what would be accepted; a refused run leaves no folder;
the command line answers `error: ...` with exit status 2 (1 when the training itself fails), never
a traceback. Some inputs are accepted on purpose (an EXIF-rotated photo, CMYK, 16-bit): there the
entry says what is done with them. The property-based half is tests/test_bad_input_properties.py;
tests/test_bad_input.py holds the older cases this corpus does not repeat.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import Accepted, checks_only, run_cli
from hub_fixtures import CANARY
from PIL import Image
from safetensors.torch import load_file, save_file
from train_helpers import tiny_config

from trainer import ConfigError, TrainConfig, train
from trainer.config import UserError
from trainer.data.photos import ImageDataError, check_images, load_rgb
from trainer.inference import GenerateRequest, generate
from trainer.loop import NonFiniteLossError, last_finite_checkpoint
from trainer.publish.hub import HubError, HubInputError, check_repo_id, check_token, publish

REPO = Path(__file__).resolve().parents[1]


# --- 1. TrainConfig values: type, range, meaning ---------------------------------------------
# (changes to a valid tiny config, the words the ConfigError must contain)
CONFIG_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"seed": -1}, "`seed` must be between 0 and 4294967295 (2**32 - 1), got -1"),  # numpy's limit
    ({"seed": 2**32}, "`seed` must be between 0 and 4294967295 (2**32 - 1), got 4294967296"),
    ({"learning_rate": float("inf")}, "`learning_rate` must be a finite number, got inf"),
    ({"learning_rate": float("nan")}, "`learning_rate` must be a finite number, got nan"),
    ({"learning_rate": 1e30}, "`learning_rate` must be > 0 and at most 1 (DreamBooth uses about 1e-6 to 1e-3)"),
    ({"train_text_encoder": True, "text_encoder_lr": float("-inf")}, "`text_encoder_lr` must be a finite number"),
    ({"adam_beta1": 1.0}, "`adam_beta1` must be in [0, 1), got 1.0"),
    ({"adam_beta2": -0.1}, "`adam_beta2` must be in [0, 1), got -0.1"),
    ({"adam_epsilon": 0.0}, "`adam_epsilon` must be > 0 (1e-8 is usual), got 0.0"),  # 0/0 = NaN at step 1
    ({"adam_weight_decay": -0.01}, "`adam_weight_decay` must be in [0, 1] (1e-2 is usual), got -0.01"),
    ({"max_grad_norm": 0.0}, "`max_grad_norm` must be > 0, got 0.0"),
    ({"prior_loss_weight": float("nan")}, "`prior_loss_weight` must be a finite number, got nan"),
    ({"offset_noise": float("inf")}, "`offset_noise` must be a finite number, got inf"),
    ({"offset_noise": 1e30}, "`offset_noise` must be in [0, 1] (0.1 is usual), got 1e+30"),  # an inf loss at step 1
    ({"prior_loss_weight": 1e39}, "`prior_loss_weight` must be in [0, 100] (1 is usual), got 1e+39"),
    ({"snr_gamma": 0.0}, "`snr_gamma` must be > 0, got 0.0"),
    ({"validation_guidance_scale": -1.0}, "`validation_guidance_scale` must be >= 0 (1 turns guidance off) and at "
                                          "most 50, got -1.0"),
    ({"resolution": 0}, "`resolution` must be a positive multiple of 8, got 0"),
    ({"resolution": 8192}, "`resolution` must be at most 4096, got 8192"),
    ({"max_train_steps": -5}, "`max_train_steps` must be at least 1, got -5"),
    ({"train_batch_size": 0}, "`train_batch_size` must be at least 1, got 0"),
    ({"gradient_accumulation_steps": 0}, "`gradient_accumulation_steps` must be at least 1, got 0"),
    ({"lora_rank": 0}, "`lora_rank` must be at least 1, got 0"),
    ({"lora_alpha": 0}, "`lora_alpha` must be > 0, got 0"),
    ({"checkpointing_steps": 0}, "`checkpointing_steps` must be at least 1, got 0"),
    ({"lr_warmup_steps": -1}, "`lr_warmup_steps` must be >= 0, got -1"),
    ({"text_encoder_steps_fraction": 0.0}, "`text_encoder_steps_fraction` must be in (0, 1], got 0.0"),
    ({"with_prior_preservation": True, "class_prompt": "a square", "num_class_images": 0},
     "`num_class_images` must be at least 1, got 0"),
    # wrong types, as a config file or a Python caller can send them
    ({"max_train_steps": "ten"}, "`max_train_steps` must be a whole number, got 'ten'"),
    ({"max_train_steps": True}, "`max_train_steps` must be a whole number, got True"),
    ({"max_train_steps": 10.0}, "`max_train_steps` must be a whole number, got 10.0"),
    ({"learning_rate": "1e-4"}, "`learning_rate` must be a number or none (null) for the default, got '1e-4'"),
    ({"with_prior_preservation": "yes"}, "`with_prior_preservation` must be true or false, got 'yes'"),
    ({"instance_data": "photos/"}, "`instance_data` must be a list of paths, got 'photos/'"),
    ({"validation_prompts": ["a photo of sks square"]}, "`validation_prompts` must be a list of prompts, got ["),
    ({"report_to": None}, "`report_to` must be one of tensorboard, wandb, none, got None"),
    # meaning
    ({"instance_data": ()}, "`instance_data` is required (a folder or image files)"),
    ({"instance_prompt": ""}, "`instance_prompt` is required"),  # an empty prompt
    ({"instance_prompt": "a photo of sksdog"}, "`instance_prompt` must contain the identifier 'sks' as a word"),
    ({"instance_prompt": "a photo of sks\x00 square"}, "`instance_prompt` must not contain a NUL character"),
    ({"instance_prompt": "a photo of sks \udcff"}, "`instance_prompt` is not valid UTF-8 text"),  # non-UTF-8 argv
    ({"identifier": ""}, "`identifier` must be one word, got ''"),
    ({"validation_prompts": ("",)}, "`validation_prompts[0]` is empty: give a prompt, or no validation prompts"),
    ({"method": "LoRA"}, "`method` must be one of full, lora, got 'LoRA'"),
    ({"mixed_precision": "fp32"}, "`mixed_precision` must be one of no, fp16, bf16, got 'fp32'"),
    ({"lr_scheduler": "cosine_annealing"}, "`lr_scheduler` must be one of constant, constant_with_warmup,"),
    ({"caption_extension": "txt"}, "`caption_extension` must be a file suffix such as '.txt'"),
    ({"revision": ""}, "`revision` must not be empty: leave it out (None) for the default"),
    ({"variant": " "}, "`variant` must not be empty"),
    ({"pretrained_vae": ""}, "`pretrained_vae` must not be empty"),
    ({"resume_from_checkpoint": ""}, "`resume_from_checkpoint` must not be empty"),
    ({"output_dir": ""}, "`output_dir` is required"),
    ({"output_dir": "runs/" + "x" * 300}, "`output_dir` has a name of 300 bytes; a file or folder name may have at most 255"),
    ({"pretrained_model": "bad id!!"}, "`pretrained_model`: 'bad id!!' is neither a local folder nor a Hub repo id"),
    ({"pretrained_model": "user/a--b"}, "`pretrained_model`: 'user/a--b' is neither a local folder nor a Hub repo id"),
]


@pytest.mark.parametrize(("changes", "message"), CONFIG_VALUES, ids=[m.split("`")[1] for _, m in CONFIG_VALUES])
def test_every_bad_config_value_names_its_field_and_leaves_no_folder(
    tiny_model_dir, subject_images, tmp_path, changes, message
):
    config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run", **changes)
    if "output_dir" in changes:
        config = config.replace(output_dir=str(tmp_path / changes["output_dir"]) if changes["output_dir"] else "")
    with pytest.raises(ConfigError) as info:
        train(config)
    assert message in str(info.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_an_over_long_validation_or_class_prompt_is_refused_before_anything_is_written(
    tiny_model_dir, subject_images, tmp_path
):
    long = "a photo of a square " + "with many details " * 30
    with pytest.raises(ConfigError, match=r"`validation_prompts\[1\]` is \d+ tokens long; the text encoder reads at most 77"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", validation_prompts=("a sks", long)))
    with pytest.raises(ConfigError, match=r"`class_prompt` is \d+ tokens long"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", with_prior_preservation=True,
                          class_prompt=long))
    assert not (tmp_path / "run").exists()


# --- 2. where a run writes: the run folder and the class-image cache -------------------------------
def test_an_output_dir_that_is_a_file_or_inside_one_is_refused_before_loading(tiny_model_dir, subject_images, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(ConfigError, match=f"`output_dir`: {a_file} is a file, not a folder; choose a folder path"):
        train(tiny_config(tiny_model_dir, subject_images, a_file))
    with pytest.raises(ConfigError, match=f"`output_dir`: {a_file}/run cannot be made: {a_file} is a file"):
        train(tiny_config(tiny_model_dir, subject_images, a_file / "run"))
    with pytest.raises(ConfigError, match=f"`class_cache_dir`: {a_file} is a file, not a folder"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", with_prior_preservation=True,
                          class_prompt="a square", class_cache_dir=str(a_file)))
    assert a_file.read_text() == "mine" and not (tmp_path / "run").exists()


def test_folders_the_system_refuses_are_named_not_tracebacks(tiny_model_dir, subject_images, tmp_path, monkeypatch):
    # Tests run as root here, where nothing is refused; the system's answer is played instead.
    import trainer.config

    monkeypatch.setattr(trainer.config.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=f"`output_dir`: {tmp_path}/run cannot be written: no write permission in "
                                          f"{tmp_path}$"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run"))
    monkeypatch.undo()

    listing = Path.iterdir

    def refused(folder: Path, *, only: Path):
        if folder == only:
            raise PermissionError(13, "Permission denied", str(folder))
        return listing(folder)

    monkeypatch.setattr(Path, "iterdir", lambda folder: refused(folder, only=subject_images))
    with pytest.raises(ImageDataError, match=f"`instance_data`: {subject_images} cannot be read \\(Permission denied\\)"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run"))
    monkeypatch.setattr(Path, "iterdir", lambda folder: refused(folder, only=tiny_model_dir))
    with pytest.raises(ConfigError, match=f"`pretrained_model`: {tiny_model_dir} cannot be read \\(Permission denied\\)"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --- 3. base models that cannot be loaded ------------------------------------------------------------
def _pickle_weights(folder: Path, part: str | None = None) -> None:
    """Replace safetensors weights by the pickle (.bin) files old checkpoints ship."""
    for file in sorted(folder.rglob("*.safetensors")):
        if part is None or file.parent.name == part:
            torch.save(load_file(file), file.with_name(file.name.replace(".safetensors", ".bin")))
            file.unlink()


def _broken_model(kind: str, model: Path, tmp_path: Path) -> str:
    """A base model source that cannot be trained from, as the user would point at it."""
    copy = tmp_path / "model"
    if kind in ("pickle_only", "unet_pickle", "truncated_unet"):
        shutil.copytree(model, copy)
        if kind == "truncated_unet":
            weights = next((copy / "unet").glob("*.safetensors"))
            weights.write_bytes(weights.read_bytes()[:200])
        else:
            _pickle_weights(copy, None if kind == "pickle_only" else "unet")
        return str(copy)
    if kind == "parent_folder":  # the folder that holds the model, not the model
        shutil.copytree(model, tmp_path / "models" / "sd")
        return str(tmp_path / "models")
    if kind == "lora_run":
        (copy).mkdir()
        (copy / "pytorch_lora_weights.safetensors").write_bytes(b"")
        (copy / "config.json").write_text("{}")
        return str(copy)
    if kind == "single_file":
        (tmp_path / "v1-5-pruned.safetensors").write_bytes(b"\0" * 16)
        return str(tmp_path / "v1-5-pruned.safetensors")
    if kind == "empty_folder":
        copy.mkdir()
        return str(copy)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("pickle_only", ConfigError,
         r"`pretrained_model`: .*/model/\w+ holds only pickle weights \(.*\.bin\), which are never loaded"),
        ("unet_pickle", ConfigError,
         r"`pretrained_model`: .*/model/unet holds only pickle weights \(diffusion_pytorch_model\.bin\)"),
        ("parent_folder", ConfigError,
         r"`pretrained_model`: .*/models has no model_index\.json, but .*/models/sd has: did you mean that folder\?"),
        ("lora_run", ConfigError, r"`pretrained_model`: .*/model is a LoRA \(pytorch_lora_weights\.safetensors\), "
                                  r"not a base model"),
        ("single_file", ConfigError, r"`pretrained_model`: .*v1-5-pruned\.safetensors is a file; .*single-file "
                                     r"checkpoint: convert it once"),
        ("empty_folder", ConfigError, r"`pretrained_model`: .*/model has no model_index\.json: expected a diffusers "
                                      r"pipeline folder"),
        # the loader's own error, naming the part and its file
        ("truncated_unet", UserError, r"`pretrained_model`: could not load the unet of .*: .*"
                                      r"unet/diffusion_pytorch_model\.safetensors"),
    ],
)
def test_a_base_model_that_cannot_load_gets_an_error_naming_the_file(
    tiny_model_dir, subject_images, tmp_path, kind, error, message
):
    source = _broken_model(kind, tiny_model_dir, tmp_path)
    with pytest.raises(error, match=message):
        train(tiny_config(source, subject_images, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_pickle_only_vae_is_refused(tiny_model_dir, subject_images, tmp_path):
    vae = tmp_path / "vae"
    shutil.copytree(tiny_model_dir / "vae", vae)
    _pickle_weights(vae)
    with pytest.raises(ConfigError, match=r"`pretrained_vae`: .*/vae holds only pickle weights"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run", pretrained_vae=str(vae)))
    assert not (tmp_path / "run").exists()


# --- 4. image files ------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (8-bit RGB), with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)


def _write_image(kind: str, folder: Path) -> Path:
    """One concrete image file of the corpus, written into `folder`; returns its path."""
    def save(image: Image.Image, name: str, **kw: Any) -> Path:
        image.save(folder / name, **kw)
        return folder / name

    if kind == "zero_bytes":
        (folder / "empty.jpg").write_bytes(b"")
        return folder / "empty.jpg"
    if kind in ("truncated_png", "truncated_jpeg"):
        path = save(_noise(96, 96), "cut." + kind.split("_")[1])
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return path
    if kind == "html_named_png":
        (folder / "photo.png").write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
        return folder / "photo.png"
    if kind == "heic_named_jpg":
        (folder / "IMG_0001.jpg").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
        return folder / "IMG_0001.jpg"
    if kind == "text_named_jpg":
        (folder / "notes.jpg").write_text("a photo of my dog")
        return folder / "notes.jpg"
    if kind == "one_pixel":
        return save(Image.new("RGB", (1, 1), "red"), "dot.png")
    if kind == "narrow":
        return save(_noise(63, 200), "narrow.png")
    if kind == "bomb_header":
        (folder / "huge.png").write_bytes(_png_header(30000, 30000))
        return folder / "huge.png"
    if kind in ("animated_gif", "animated_png"):
        frames = [Image.new("RGB", (80, 80), color) for color in ("red", "green", "blue")]
        suffix = kind.split("_")[1]
        return save(frames[0], f"moving.{suffix}", save_all=True, append_images=frames[1:], duration=100)
    if kind == "float_tiff":
        return save(Image.new("F", (80, 80), 0.5), "depth.tif")
    if kind == "sixteen_bit":
        return save(Image.fromarray(np.full((80, 96), 40000, dtype=np.uint16)), "deep.png")
    if kind == "cmyk":
        return save(Image.new("CMYK", (80, 96), (0, 255, 255, 0)), "print.jpg")
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
        return save(_noise(120, 80), "phone.jpg", exif=exif)
    if kind == "transparent":
        return save(Image.new("RGBA", (80, 80), (255, 0, 0, 0)), "cutout.png")
    if kind == "small":
        return save(_noise(64, 64), "small.png")
    if kind == "non_utf8_name":
        path = save(_noise(80, 80), "tmp.png")
        target = os.fsencode(folder) + b"/\xff\xfe photo.png"
        os.rename(os.fsencode(path), target)
        return Path(os.fsdecode(target))
    raise AssertionError(kind)


# (kind, the message for a refused file | None when accepted, what an accepted file gives)
IMAGES: list[tuple[str, str | None, str | None]] = [
    ("zero_bytes", "empty.jpg: empty file (0 bytes)", None),
    ("truncated_png", "cut.png: is truncated or corrupt", None),
    ("truncated_jpeg", "cut.jpeg: is truncated or corrupt", None),
    ("html_named_png", "photo.png: is not an image: it looks like an HTML page (a web page saved under an image "
                       "name, or a failed download)", None),
    ("heic_named_jpg", "IMG_0001.jpg: is not an image: it looks like a HEIC/AVIF photo, which cannot be read here; "
                       "export it as JPEG or PNG", None),
    ("text_named_jpg", "notes.jpg: is not an image (Pillow cannot identify its format)", None),
    ("one_pixel", "dot.png: is 1x1 px; at least 64 px on each side is needed", None),
    ("narrow", "narrow.png: is 63x200 px; at least 64 px on each side is needed", None),
    # A header claiming 30000x30000 is refused at open, before 2.7 GB of pixels are allocated.
    ("bomb_header", "huge.png: is too large (decompression-bomb limit)", None),
    # Refused, not first-frame-taken: diffusers' and kohya's scripts silently train on frame 0, but the
    # frames of a clip differ and which one was meant is the user's call (our rule: a concise error
    # rather than a silent correction); exporting the frame wanted takes seconds.
    ("animated_gif", "moving.gif: is animated (3 frames); use a still image", None),
    ("animated_png", "moving.png: is animated (3 frames); use a still image", None),
    ("float_tiff", "depth.tif: has 32-bit float pixels, which cannot be trained on; save it as 8 or 16 bit", None),
    # Accepted: every DreamBooth tool converts these; ours scales 16 bit (Pillow alone would clip to white).
    ("sixteen_bit", None, "RGB 96x80, grey 156"),
    ("cmyk", None, "RGB 80x96"),
    # Accepted upright: the EXIF orientation is applied, as the photo viewer and diffusers' scripts do.
    ("exif_rotated", None, "RGB 80x120"),
    ("transparent", None, "RGB 80x80, white"),  # transparent pixels become white, not their hidden colour
    ("small", None, "note: small.png is 64x64 px, smaller than the training resolution 128: it will be upscaled"),
    ("non_utf8_name", None, "RGB 80x80"),  # a name that is not UTF-8 is a name like any other
]


@pytest.mark.parametrize(("kind", "refusal", "accepted"), IMAGES, ids=[k for k, _, _ in IMAGES])
def test_every_bad_image_file_is_named_with_its_problem(tmp_path, kind, refusal, accepted):
    path = _write_image(kind, tmp_path)
    if refusal is not None:
        with pytest.raises(ImageDataError) as info:
            check_images([path], resolution=128)
        assert str(info.value).startswith(refusal)
        return
    notes = check_images([path], resolution=128)
    image = load_rgb(path)
    if accepted.startswith("note: "):
        assert notes == [accepted.removeprefix("note: ")]
        return
    mode_size = accepted.split(",")[0]
    assert f"{image.mode} {image.width}x{image.height}" == mode_size
    if "grey 156" in accepted:  # 40000 / 65535 of white, not clipped to 255
        assert image.getpixel((0, 0)) == (156, 156, 156)
    if "white" in accepted:
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_image_paths_with_traversal_are_resolved_not_trusted(tiny_model_dir, subject_images, tmp_path):
    """`..` in a path is followed like any path: a file given twice that way trains once, and a path
    climbing to where nothing is gets the path named."""
    from trainer.data.photos import collect_image_paths

    twice = collect_image_paths([subject_images, subject_images / ".." / subject_images.name / "subject_0.png"])
    assert len(twice) == 4
    with pytest.raises(ImageDataError, match=r"`instance_data`: .*\.\./\.\./etc/shadow\.png does not exist"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run",
                          instance_data=(str(subject_images / ".." / ".." / "etc" / "shadow.png"),)))
    assert not (tmp_path / "run").exists()


# --- 5. the command line: flags and config files, in-process through main() -------------------------------
@pytest.fixture
def base_args(tiny_model_dir, subject_images, tmp_path) -> list[str]:
    return ["train", "--pretrained-model", str(tiny_model_dir), "--instance-data", str(subject_images),
            "--instance-prompt", "a photo of sks square", "--resolution", "32", "--max-train-steps", "1",
            "--report-to", "none", "--output-dir", str(tmp_path / "run")]


# (flags added to a valid command line, the start of stderr); exit status 2 for each.
CLI_FLAGS: list[tuple[list[str], str]] = [
    (["--seed", "x"], "error: argument --seed: invalid int value: 'x' (see "),
    (["--resolution", "512.5"], "error: argument --resolution: invalid int value: '512.5'"),
    (["--method", "dora"], "error: argument --method: invalid choice: 'dora' (choose from"),
    (["--max-steps", "5"], "error: unrecognized arguments: --max-steps 5"),
    (["--seed", "-1"], "error: `seed` must be between 0 and 4294967295"),
    (["--learning-rate", "inf"], "error: `learning_rate` must be a finite number, got inf"),
    (["--adam-beta1", "nan"], "error: `adam_beta1` must be a finite number, got nan"),
    (["--validation-prompts", ""], "error: `validation_prompts[0]` is empty"),
    (["--push-to-hub", "bad repo!!"], "error: `--push-to-hub`: Invalid repo id 'bad repo!!': "),
    (["--push-to-hub", "user/name.git"], "error: `--push-to-hub`: Invalid repo id 'user/name.git'"),
    (["--push-to-hub", " "], "error: `--push-to-hub`: The repo id is empty: give 'name' or 'username/name'."),
    (["--push-to-hub", "sks-square", "--token-env", "NO_SUCH_VARIABLE_HERE"],
     "error: `--token-env`: the environment variable NO_SUCH_VARIABLE_HERE is not set"),
]


@pytest.mark.parametrize(("flags", "stderr"), CLI_FLAGS, ids=[" ".join(f) for f, _ in CLI_FLAGS])
def test_every_bad_flag_exits_2_with_one_error_line_and_no_folder(base_args, tmp_path, flags, stderr):
    with checks_only():
        status, err = run_cli(base_args + flags)
    assert (status, err[: len(stderr)]) == (2, stderr)
    assert not (tmp_path / "run").exists()


# (the config file's bytes, the message after "error: <file>: ")
CONFIG_FILES: list[tuple[bytes, str]] = [
    (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    (b'{"seed": 1,', "not valid JSON (Expecting property name enclosed in double quotes"),  # truncated
    (b"\xff\xfe{\x00}\x00", "not UTF-8 text (expected a JSON config file)"),
    (b"[1, 2]", "expected a JSON object of config fields, got a list"),
    (b'"config"', "expected a JSON object of config fields, got a string"),
    (b"null", "expected a JSON object of config fields, got null"),
    (b"[" * 100_000, "not valid JSON (nested too deeply)"),
    (b'{"max_steps": 3}', "unknown config field(s): max_steps (did you mean max_train_steps?)"),
    (b'{"max_train_steps": "ten"}', "`max_train_steps` must be a whole number, got 'ten'"),
    (b'{"learning_rate": NaN}', "`learning_rate` must be a finite number, got nan"),
    (b'{"seed": 1e400}', "`seed` must be a whole number, got inf"),
    (b'{"instance_data": 5}', "`instance_data` must be a list of paths, got 5"),
    (b'{"instance_data": null}', "`instance_data` must be a list of paths, got None"),
    (b'{"center_crop": "false"}', "`center_crop` must be true or false, got 'false'"),
]


@pytest.mark.parametrize(("content", "message"), CONFIG_FILES, ids=[m[:40] for _, m in CONFIG_FILES])
def test_every_bad_config_file_is_named_with_its_problem(tmp_path, content, message):
    file = tmp_path / "run.json"
    file.write_bytes(content)
    with checks_only():
        status, err = run_cli(["train", "--config", str(file), "--output-dir", str(tmp_path / "run")])
    assert status == 2 and err.startswith(f"error: {file}: {message}")
    assert not (tmp_path / "run").exists()


def test_missing_config_files_and_fields_say_where_to_set_them(tiny_model_dir, subject_images, tmp_path):
    with checks_only():
        assert run_cli(["train", "--config", str(tmp_path / "nope.json")]) == (
            2, f"error: {tmp_path / 'nope.json'}: no such config file\n")
        run = tmp_path / "old-run"
        run.mkdir()
        (run / "config.json").write_text("{}")
        assert run_cli(["train", "--config", str(run)]) == (
            2, f"error: {run}: is a folder, not a config file (did you mean {run / 'config.json'}?)\n")
        (tmp_path / "partial.json").write_text(json.dumps({"instance_prompt": "a photo of sks square"}))
        status, err = run_cli(["train", "--config", str(tmp_path / "partial.json")])
        assert status == 2 and err == (f"error: `pretrained_model` is required (a Hub id or a local folder) "
                                       f"(set it in {tmp_path / 'partial.json'} or with --pretrained-model)\n")
        # A UTF-8 file with a byte-order mark (Windows Notepad's) is a valid config file.
        config = tiny_config(tiny_model_dir, subject_images, tmp_path / "run")
        (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(config.to_dict()).encode())
        with pytest.raises(Accepted) as accepted:
            run_cli(["train", "--config", str(tmp_path / "bom.json")])
    assert accepted.value.config == config


def test_push_subcommand_refuses_bad_targets_before_the_network(tmp_path):
    assert run_cli(["push", str(tmp_path), "--repo-id", "a/b/c"])[1].startswith(
        "error: `--repo-id`: Invalid repo id 'a/b/c': Repo id must be in the form 'repo_name' or 'namespace/repo_name'")
    assert run_cli(["push", str(tmp_path / "nothing"), "--repo-id", "me/sks"]) == (
        2, f"error: {tmp_path / 'nothing'} is not a run folder: it has no config.json.\n")


# --- 6. Hub arguments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("repo_id", "message"),
    [
        ("", "The repo id is empty"),
        ("bad repo!!", "Invalid repo id 'bad repo!!': Repo id must use alphanumeric chars"),
        ("a/b/c", "Invalid repo id 'a/b/c': Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
        ("x" * 97, "Invalid repo id 'xxxx"),
        ("me/a--b", "Invalid repo id 'me/a--b': Cannot have -- or .. in repo_id"),
        ("me/model.ipynb", "Invalid repo id 'me/model.ipynb': a repo name cannot end with .git or .ipynb."),
        ("-me/model", "Invalid repo id '-me/model'"),
    ],
)
def test_invalid_repo_ids_are_refused_as_input(repo_id, message):
    with pytest.raises(HubInputError) as info:
        check_repo_id(repo_id)
    assert str(info.value).startswith(message) and isinstance(info.value, ValueError)  # exit status 2


def test_publishing_what_is_not_a_finished_run_is_refused_and_no_token_is_ever_quoted(tmp_path, monkeypatch):
    (tmp_path / "half").mkdir()
    TrainConfig().save(tmp_path / "half" / "config.json")
    with pytest.raises(HubInputError, match="has no trained weights yet"):
        publish(tmp_path / "half", "me/sks", token=CANARY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as info:  # the Hub is not reachable here: the message says so, not the token
        check_token(CANARY)
    assert CANARY not in str(info.value) and CANARY not in repr(info.value.args)


# --- 7. Generate requests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": None}, "`prompt` must be text, got None"),
        ({"negative_prompt": "ugly\x00"}, "`negative_prompt` must not contain a NUL character"),
        ({"scheduler": 3}, "`scheduler` must be text, got 3"),
        ({"guidance_scale": float("nan")}, "`guidance_scale` must be a finite number, got nan"),
        ({"guidance_scale": float("inf")}, "`guidance_scale` must be a finite number, got inf"),
        ({"guidance_scale": 1000.0}, "`guidance_scale` must be at most 50 (7.5 is usual), got 1000.0"),
        ({"steps": 2.5}, "`steps` must be a whole number, got 2.5"),
        ({"num_images": True}, "`num_images` must be a whole number, got True"),
        ({"width": "512"}, "`width` must be a whole number, got '512'"),
        ({"width": 0}, "`width` and `height` must be between 8 and 2048, got 0 and 512"),
        ({"height": 516}, "`width` and `height` must be multiples of 8, got 512 and 516"),
        ({"seed": 2**63}, "`seed` must be between 0 and 2**63 - 1, got 9223372036854775808"),
        ({"lora_scale": float("nan")}, "`lora_scale` must be a finite number, got nan"),
    ],
)
def test_bad_generate_requests_name_the_field(changes, message):
    with pytest.raises(ValueError) as info:
        GenerateRequest(**{"prompt": "a photo of sks dog", **changes}).validate()
    assert str(info.value) == message or str(info.value).startswith(message)


def test_an_over_long_generate_prompt_is_refused_not_cut(tiny_model_dir):
    from trainer.run_folder import load_pipeline

    pipe = load_pipeline(tiny_model_dir, torch.float32)
    long = "a photo of sks dog " + "in a garden " * 40
    with pytest.raises(ValueError, match=r"^`prompt` is \d+ tokens long; the text encoder reads at most 77"):
        generate(pipe, GenerateRequest(long, steps=1, width=32, height=32))
    with pytest.raises(ValueError, match=r"^`negative_prompt` is \d+ tokens long"):
        generate(pipe, GenerateRequest("a dog", negative_prompt=long, steps=1, width=32, height=32))


# --- 8. the Train form ---------------------------------------------------------------------------------------------
def _form(images: list[str], **changes: Any) -> dict[str, Any]:
    values = {"images": images, "identifier": "sks", "class_noun": "dog", "concept": "object",
              "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "method": "lora",
              "base_model": "some/model", "with_prior_preservation": False, "num_class_images": 50,
              "max_train_steps": 6, "learning_rate": 1e-4, "train_batch_size": 1, "gradient_accumulation_steps": 1,
              "train_text_encoder": False, "text_encoder_steps_fraction": 0.3, "resolution": 32,
              "use_8bit_adam": True, "gradient_checkpointing": False, "mixed_precision": "no", "seed": 7,
              "checkpointing_steps": 3, "validation_prompt": "", "validation_steps": 2}
    return {**values, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_train_steps": float("inf")}, "`max_train_steps` must be a finite number, got inf"),
        ({"max_train_steps": "1e999"}, "`max_train_steps` must be a finite number, got '1e999'"),
        ({"max_train_steps": [6]}, "`max_train_steps` must be a number, got [6]"),
        ({"seed": float("nan")}, "`seed` must be a finite number, got nan"),
        ({"seed": -1}, "`seed` must be between 0 and 4294967295"),
        ({"learning_rate": float("inf")}, "`learning_rate` must be a finite number, got inf"),
        ({"resolution": "abc"}, "`resolution` must be a number, got 'abc'"),
        ({"with_prior_preservation": "maybe"}, "`with_prior_preservation` must be true or false, got 'maybe'"),
        ({"base_model": "stable diffusion"}, "`pretrained_model`: 'stable diffusion' is neither a local folder"),
    ],
)
def test_bad_form_values_get_the_engines_words(tmp_path, changes, message):
    from space.form import form_to_config

    images = [str(tmp_path / f"{i}.png") for i in range(4)]
    with pytest.raises(ConfigError) as info:
        form_to_config(_form(images, **changes), tmp_path / "runs")
    assert str(info.value).startswith(message)
    assert not (tmp_path / "runs").exists()


def test_form_numbers_as_text_are_read_exactly(tmp_path):
    from space.form import form_to_config

    images = [str(tmp_path / f"{i}.png") for i in range(4)]
    config = form_to_config(_form(images, max_train_steps="1e3", seed="4294967295", with_prior_preservation="false"),
                            tmp_path / "runs")
    assert (config.max_train_steps, config.seed, config.with_prior_preservation) == (1000, 2**32 - 1, False)


# --- 9. a training that diverges -------------------------------------------------------------------------------------
def _no_weights_saved(run: Path) -> bool:
    return not any((run / name).exists() for name in ("model_index.json", "unet", "pytorch_lora_weights.safetensors",
                                                      "pytorch_lora_weights_kohya.safetensors", "README.md"))


def test_a_diverging_run_stops_at_once_keeps_its_last_good_checkpoint_and_saves_no_weights(
    tiny_model_dir, subject_images, tmp_path
):
    # A real cause: full fine-tuning at learning rate 1, the highest `validate` accepts. AdamW moves
    # every weight by about 1 per step, and within a few steps the UNet's activations overflow.
    run = tmp_path / "run"
    tiny_config(tiny_model_dir, subject_images, run, method="full", learning_rate=1.0, max_train_steps=40,
                checkpointing_steps=2, checkpoints_total_limit=None).save(tmp_path / "run.json")
    status, err = run_cli(["train", "--config", str(tmp_path / "run.json"), "--quiet"])
    assert status == 1, err
    found = re.match(r"error: Training stopped at step (\d+) of 40: the (loss|gradient norm) is (nan|inf), not a "
                     r"finite number\. Likely causes: a learning rate too high for this model \(learning_rate 1: "
                     r"try 10 times lower\) \(an fp16 overflow, the other usual cause, is ruled out", err)
    assert found, err
    failed_at = int(found.group(1))
    assert 1 < failed_at < 40
    last = (failed_at - 1) // 2 * 2
    assert f"The last good checkpoint, checkpoints/checkpoint-{last:06d}, is kept" in err
    assert "Traceback" not in err
    # Stopped before the failing step was logged, checkpointed or applied; nothing saved as the result.
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, failed_at))
    assert all(np.isfinite(m["loss"]) for m in metrics)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints[-1] == f"checkpoint-{last:06d}"
    assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoints" / checkpoints[-1] / "unet.safetensors").values())
    assert json.loads((run / "run.json").read_text()) == {"status": "failed", "step": failed_at - 1,
                                                          "total_steps": 40, "family": "sd", "processes": 1,
                                                          "effective_batch": 1}
    assert _no_weights_saved(run)


def test_a_non_finite_loss_stops_before_the_optimizer_applies_it(tiny_model_dir, subject_images, tmp_path, monkeypatch):
    """Whatever makes the loss NaN (here the third loss is made NaN), the optimizer never steps on it."""
    import trainer.loop as loop

    losses, steps = [], []
    real_loss, real_optimizer = loop.dreambooth_loss, loop.make_optimizer

    def nan_on_third(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        losses.append(parts)
        if len(losses) == 3:
            return type(parts)(parts.total * float("nan"), parts.instance, parts.prior)
        return parts

    def counting_optimizer(*args, **kwargs):
        optimizer = real_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: steps.append(1))
        return optimizer

    monkeypatch.setattr(loop, "dreambooth_loss", nan_on_third)
    monkeypatch.setattr(loop, "make_optimizer", counting_optimizer)
    with pytest.raises(NonFiniteLossError, match=r"^Training stopped at step 3 of 6: the loss is nan.* No checkpoint "
                                                 r"had been saved yet \(checkpointing_steps 1000\); no weights were saved"):
        train(tiny_config(tiny_model_dir, subject_images, tmp_path / "run"))
    assert len(steps) == 2
    assert _no_weights_saved(tmp_path / "run")


def test_checkpoints_holding_non_finite_weights_are_not_the_one_kept(tmp_path):
    root = tmp_path / "checkpoints"
    # A step can overflow the weights while its loss and gradients were still finite: the checkpoint
    # written after it must not be the one a resume picks up.
    for step, value in ((2, 1.0), (4, float("nan")), (6, float("inf"))):
        folder = root / f"checkpoint-{step:06d}"
        folder.mkdir(parents=True)
        save_file({"w": torch.tensor([0.5, value])}, folder / "unet.safetensors")
        (folder / "state.json").write_text(json.dumps({"step": step, "text_encoder_frozen": True}))
    good, removed = last_finite_checkpoint(tmp_path)
    assert good == root / "checkpoint-000002"
    assert [p.name for p in removed] == ["checkpoint-000006", "checkpoint-000004"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-000002"]


# --- 10. a few through a real process: the exit status and stderr a shell sees ---------------------------------------------
def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_in_a_real_process_bad_input_exits_2_with_one_error_line_before_anything_is_made(base_args, tmp_path):
    cases = [
        (base_args + ["--seed", "-1"], "error: `seed` must be between 0 and 4294967295"),  # was a numpy traceback
        (base_args + ["--learning-rate", "inf"], "error: `learning_rate` must be a finite number, got inf"),
        (["train", "--config", str(tmp_path / "missing.json")], f"error: {tmp_path / 'missing.json'}: no such config"),
        # With a valid token in the environment the repo id is still refused first: no training, no token in sight.
        (base_args + ["--push-to-hub", "bad repo!!"], "error: `--push-to-hub`: Invalid repo id 'bad repo!!'"),
    ]
    for args, stderr in cases:
        done = _cli(args, HF_TOKEN=CANARY)
        assert (done.returncode, done.stderr[: len(stderr)]) == (2, stderr), done.stderr
        assert done.stderr.count("\n") == 1 and CANARY not in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()
