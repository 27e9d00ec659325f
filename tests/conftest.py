"""Shared fixtures: the tiny SD models (built once per session) and a folder of subject images.

Kept light on purpose: the environment defaults below must be set before anything from Hugging
Face or gradio is imported, and the heavy imports happen inside the fixtures that need them.
"""

from __future__ import annotations

import os

# Offline, quiet and single-threaded tokenizers for every test, unless the caller chose otherwise.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)

from pathlib import Path

import pytest

# Fixtures that several test modules use, imported here so that pytest finds them by name.
from hub_fixtures import *  # noqa: F403
from tiny_model import tiny_base_of
from ui_fixtures import *  # noqa: F403

SUBJECT_SIZE = 64
# Where the subject's square sits in each image: one subject, seen slightly differently each time.
SUBJECT_OFFSETS: tuple[tuple[int, int], ...] = ((0, 0), (5, -3), (-4, 4), (3, 6))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.5-shaped base model (epsilon prediction), saved once for the whole session."""
    from tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with a v-prediction scheduler (as SD 2.x 768 models use)."""
    from tiny_model import build_tiny_pipeline

    return build_tiny_pipeline(
        tmp_path_factory.mktemp("tiny-sd-vpred") / "model", prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL base model (two text encoders, text_time UNet), saved once for the whole session."""
    from tiny_model import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_sd3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion 3 (MMDiT transformer, CLIP-L, CLIP-G, T5), saved once for the whole session."""
    from tiny_transformers import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "model")


@pytest.fixture(scope="session")
def tiny_flux_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev (guidance-embedding transformer, CLIP, T5), saved once for the whole session."""
    from tiny_transformers import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


@pytest.fixture(params=["sd", "sdxl", "sd3", "flux"])
def tiny_base(request: pytest.FixtureRequest):
    """Each tiny base model in turn (SD 1.x, SDXL, SD 3, FLUX.1): for the tests every model family must pass."""
    return tiny_base_of(request, request.param)


@pytest.fixture(params=["sd", "sdxl", "sd3"])
def tiny_full_base(request: pytest.FixtureRequest):
    """Each tiny base model whose family trains in full on one card (FLUX.1's ~120 GB is refused)."""
    return tiny_base_of(request, request.param)


@pytest.fixture
def subject_images(tmp_path: Path) -> Path:
    """A folder of 4 distinct 64x64 PNGs of one subject: a red square on white, shifted per image."""
    from PIL import Image, ImageDraw

    folder = tmp_path / "subject"
    folder.mkdir()
    half = 14
    for i, (dx, dy) in enumerate(SUBJECT_OFFSETS):
        image = Image.new("RGB", (SUBJECT_SIZE, SUBJECT_SIZE), "white")
        cx, cy = SUBJECT_SIZE // 2 + dx, SUBJECT_SIZE // 2 + dy
        ImageDraw.Draw(image).rectangle(
            (cx - half, cy - half, cx + half - 1, cy + half - 1), fill=(220, 20, 20)
        )
        image.save(folder / f"subject_{i}.png")
    return folder
