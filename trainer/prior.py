"""Class images for prior preservation: the user's own, topped up from a seeded, shared cache.

The cache is keyed by what decides how the images look (base model, revision, class prompt,
resolution), so a second run with the same class generates nothing, and a run with another
identifier or instance set reuses the same class images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .config import TrainConfig
from .data import IMAGE_SUFFIXES
from .families import Components

MANIFEST = "manifest.json"


def default_cache_root() -> Path:
    base = os.environ.get("DREAMBOOTH_STUDIO_CACHE") or Path.home() / ".cache" / "dreambooth-studio"
    return Path(base) / "class-images"


def cache_dir_for(config: TrainConfig) -> Path:
    fields = [config.pretrained_model, config.revision, config.variant, config.class_prompt, config.resolution]
    if config.pretrained_vae:  # another VAE decodes other images (kept out of the key otherwise: old caches stay)
        fields.append(config.pretrained_vae)
    key = json.dumps(fields)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", config.class_prompt.lower()).strip("-")[:40] or "class"
    root = Path(config.class_cache_dir) if config.class_cache_dir else default_cache_root()
    return root / f"{slug}-{config.resolution}-{digest}"


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def class_images(
    config: TrainConfig,
    parts: Components,
    device: torch.device,
    on_progress: Callable[[int, int], None],
    should_stop: Callable[[], bool] = lambda: False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[Path]:
    """Return `num_class_images` paths: the user's folder first, then cached/generated ones.

    `should_stop` is asked between batches; images generated until then stay in the cache.
    `autocast` is the run's mixed-precision context: the UNet and text encoders may be in half
    precision while the VAE stays in fp32, and autocast lets their tensors meet.
    """
    own = _images_in(Path(config.class_data_dir)) if config.class_data_dir else []
    if len(own) >= config.num_class_images:
        return own[: config.num_class_images]
    needed = config.num_class_images - len(own)
    cache = cache_dir_for(config)
    cached = _images_in(cache)
    missing = needed - len(cached)
    if missing > 0:
        _generate(config, parts, device, cache, start=len(cached), count=missing, on_progress=on_progress,
                  should_stop=should_stop, autocast=autocast)
        cached = _images_in(cache)
    return own + cached[:needed]


def _generate(
    config: TrainConfig,
    parts: Components,
    device: torch.device,
    cache: Path,
    start: int,
    count: int,
    on_progress: Callable[[int, int], None],
    should_stop: Callable[[], bool],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> None:
    """Generate images start..start+count-1; image i is seeded with i, so the cache is reproducible."""
    from .output import pipeline_from_parts

    cache.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_from_parts(parts, parts.unet, parts.text_encoders)
    done = 0
    while done < count and not should_stop():
        batch = min(config.sample_batch_size, count - done)
        indices = range(start + done, start + done + batch)
        generators = [torch.Generator(device="cpu").manual_seed(i) for i in indices]
        with torch.no_grad(), autocast():
            images = pipe(
                [config.class_prompt] * batch,
                num_inference_steps=config.class_inference_steps,
                height=config.resolution,
                width=config.resolution,
                generator=generators,
            ).images
        for index, image in zip(indices, images, strict=True):
            # Written under a temporary name, then renamed: a killed run leaves no half image.
            tmp = cache / f".class-{index:05d}.png.tmp"
            image.save(tmp, format="PNG")
            tmp.replace(cache / f"class-{index:05d}.png")
        done += batch
        on_progress(done, count)
    _write_manifest(cache, config, total=start + done)


def _write_manifest(cache: Path, config: TrainConfig, total: int) -> None:
    manifest = {
        "base_model": config.pretrained_model,
        "revision": config.revision,
        "variant": config.variant,
        "vae": config.pretrained_vae,
        "class_prompt": config.class_prompt,
        "resolution": config.resolution,
        "scheduler": "DPMSolverMultistepScheduler",
        "num_inference_steps": config.class_inference_steps,
        "guidance_scale": 7.5,
        "seeds": f"image i is generated with torch.Generator().manual_seed(i), i = 0..{total - 1}",
        "images": total,
    }
    tmp = cache / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(cache / MANIFEST)
