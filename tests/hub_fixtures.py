"""Fixtures shared by the Hub, inference and app tests: the fake Hub, and trained run folders.

conftest.py star-imports this module so that pytest finds the fixtures by name; test modules import
the plain names (CANARY, make_run) from here, never from one another.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import FakeHub

__all__ = ["CANARY", "full_run", "hub", "lora_run", "make_run"]

# A token that must never appear in a file, a log or an output: tests plant it and search for it.
CANARY = "hf_CanaryTokenThatMustNeverBeWrittenAnywhere42"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running fake Hub, with huggingface_hub pointed at it and away from any real token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake Hub speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with FakeHub() as server:
        # As if HF_ENDPOINT had been set before the import: the engine reads the variable, and a few
        # client paths read `constants` (create_repo(exist_ok=True) on a repo it may not create).
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        yield server
        assert server.unhandled == [], "the client called endpoints the fake Hub does not implement"


@pytest.fixture
def lora_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return make_run(tmp_path / "runs" / "sks-lora", tiny_model_dir, "lora")


@pytest.fixture
def full_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    return make_run(tmp_path / "runs" / "sks-full", tiny_model_dir, "full")


def make_run(
    run_dir: Path, base_dir: Path, method: str, *, pretrained_model: str | None = None, seed: int = 0
) -> Path:
    """A finished run of the tiny model: config, weights (perturbed so they differ from the base),
    two steps of samples, and the checkpoints, logs and metrics that must never be uploaded."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image

    from trainer.config import TrainConfig

    run_dir.mkdir(parents=True, exist_ok=True)
    TrainConfig(
        pretrained_model=pretrained_model or str(base_dir),
        instance_data=(str(run_dir.parent / "subject"),),
        identifier="sks",
        instance_prompt="a photo of sks dog",
        output_dir=str(run_dir),
        method=method,  # type: ignore[arg-type]
        max_train_steps=10,
        resolution=32,
        validation_prompts=("a photo of sks dog on the beach",),
        seed=seed,
    ).save(run_dir / "config.json")

    generator = torch.Generator().manual_seed(seed)
    if method == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
        unet.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        StableDiffusionPipeline.save_lora_weights(
            run_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            base_dir, safety_checker=None, requires_safety_checker=False
        )
        with torch.no_grad():
            for param in pipe.unet.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        pipe.save_pretrained(run_dir, safe_serialization=True)

    samples = run_dir / "samples"
    samples.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for step in (5, 10):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(samples / f"step-{step:06d}-p0-0.png")
    checkpoint = run_dir / "checkpoints" / "checkpoint-000010"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "model.safetensors").write_bytes(b"checkpoint weights")
    (checkpoint / "optimizer.bin").write_bytes(b"optimizer state")
    (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "logs" / "train.log").write_text("step 10 loss 0.1\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "loss": 0.1}\n')
    return run_dir


def train_tiny_run(base_dir: Path, run_dir: Path, method: str = "lora", **changes) -> Path:
    """A real (short) training of a tiny base model, SD or SDXL, with the subject of `subject_images`
    drawn again here so that no fixture order matters; returns the run folder."""
    from PIL import Image, ImageDraw

    from trainer import TrainConfig, train

    photos = run_dir.parent / f"{run_dir.name}-photos"
    photos.mkdir(parents=True, exist_ok=True)
    for i, dx in enumerate((0, 4, -4)):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle((18 + dx, 18, 45 + dx, 45), fill=(220, 20, 20))
        image.save(photos / f"subject_{i}.png")
    config = TrainConfig(
        pretrained_model=str(base_dir), instance_data=(str(photos),), identifier="sks",
        instance_prompt="a photo of sks dog", output_dir=str(run_dir), resolution=32, method=method,
        max_train_steps=4, learning_rate=1e-2, use_8bit_adam=False, report_to="none",
        validation_prompts=("a photo of sks dog",), validation_steps=4, validation_inference_steps=2,
    ).replace(**changes)
    return train(config).run_dir
