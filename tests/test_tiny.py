"""The bundled CLIP tokenizer and the tiny SD model that the other tests and the offline demo use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import TOKENIZER_DIR, build_tiny_pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
# What SD 1.5's own tokenizer gives for this prompt (sks = 48136, dog = 1929).
SD15_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]


def _generate(model_dir: Path, seed: int, steps: int = 3) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    out = pipe("a photo of sks dog", num_inference_steps=steps, generator=generator, output_type="np")
    return out.images[0]


def test_tokenizer_gives_sd15_ids() -> None:
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tokenizer = cls.from_pretrained(TOKENIZER_DIR)
        assert len(tokenizer) == 49408
        assert tokenizer.model_max_length == 77
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
            "<|startoftext|>",
            "<|endoftext|>",
            "<|endoftext|>",
        )
        assert tokenizer("a photo of sks dog").input_ids == SD15_IDS


def test_build_script_reproduces_bundled_tokenizer(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "build_clip_tokenizer", REPO_ROOT / "tools" / "build_clip_tokenizer.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        source = script.default_source()
    except FileNotFoundError:
        pytest.skip("open-clip-torch's BPE file is not installed")
    if not source.is_file():
        pytest.skip("open-clip-torch's BPE file is not installed")
    out = script.build(source, tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_tiny_model_has_sd15_layout(tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert not list(tiny_model_dir.rglob("*.bin"))
    assert len(list(tiny_model_dir.rglob("*.safetensors"))) == 3
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet", use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(
        tiny_model_dir, subfolder="text_encoder", use_safetensors=True
    )
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    scheduler = PNDMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")

    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert vae.config.latent_channels == unet.config.in_channels
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert tokenizer("a photo of sks dog").input_ids == SD15_IDS
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_tiny_model_generates_deterministically(tiny_model_dir: Path) -> None:
    first = _generate(tiny_model_dir, seed=0)
    assert first.shape == (32, 32, 3)
    np.testing.assert_array_equal(first, _generate(tiny_model_dir, seed=0))
    assert not np.allclose(first, _generate(tiny_model_dir, seed=1))


def test_vpred_model_generates(tiny_vpred_model_dir: Path) -> None:
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_pretrained(tiny_vpred_model_dir, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert np.isfinite(_generate(tiny_vpred_model_dir, seed=0, steps=2)).all()


def test_same_seed_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        reference = load_file(tiny_model_dir / f"{part}.safetensors")
        same = load_file(again / f"{part}.safetensors")
        assert all(torch.equal(reference[k], same[k]) for k in reference), part
        different = load_file(other / f"{part}.safetensors")
        assert not all(torch.equal(reference[k], different[k]) for k in reference), part


def test_unknown_prediction_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_pipeline(tmp_path / "model", prediction_type="sample")


def test_subject_images_fixture(subject_images: Path) -> None:
    from PIL import Image

    paths = sorted(subject_images.glob("*.png"))
    assert len(paths) == 4
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.shape == (64, 64, 3) for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 4
