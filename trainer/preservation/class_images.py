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

from trainer import atomic
from trainer.config import TrainConfig
from trainer.data.photos import IMAGE_SUFFIXES
from trainer.families import Components

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
    share: tuple[int, int] = (0, 1),
    wait: Callable[[], None] = lambda: None,
) -> list[Path]:
    """Return `num_class_images` paths: the user's folder first, then cached/generated ones.

    `should_stop` is asked between batches; images generated until then stay in the cache.
    `autocast` is the run's mixed-precision context: the denoiser and text encoders may be in half
    precision while the VAE stays in fp32, and autocast lets their tensors meet.
    With several processes, `share` is (this process, how many) and `wait` their barrier: every
    process lists what is missing, cuts it into the batches one process would generate and makes
    every n-th batch, so none is made twice and each image comes out of the same batch as in a
    one-process run: the same bytes (a denoiser's output for one image depends, at float rounding, on
    what else is in its batch; a split by image flipped a pixel of the toy model's class images).
    """
    own = _images_in(Path(config.class_data_dir)) if config.class_data_dir else []
    if len(own) >= config.num_class_images:
        return own[: config.num_class_images]
    needed = config.num_class_images - len(own)
    cache = cache_dir_for(config)
    missing = [i for i in range(needed) if not class_image_path(cache, i).is_file()]
    wait()  # all processes have listed the cache before any writes to it
    rank, world = share
    size = config.sample_batch_size
    batches = [missing[i : i + size] for i in range(0, len(missing), size)]
    mine = [index for batch in batches[rank::world] for index in batch]  # only the last batch may be short
    if mine:
        _generate(config, parts, device, cache, mine, on_progress=on_progress,
                  should_stop=should_stop, autocast=autocast)
    wait()  # every share is in the cache
    if missing and rank == 0:
        _write_manifest(cache, config, total=len(_images_in(cache)))
    return own + _images_in(cache)[:needed]


def class_image_path(cache: Path, index: int) -> Path:
    return cache / f"class-{index:05d}.png"


def _generate(
    config: TrainConfig,
    parts: Components,
    device: torch.device,
    cache: Path,
    indices: list[int],
    on_progress: Callable[[int, int], None],
    should_stop: Callable[[], bool],
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> None:
    """Generate the images numbered `indices`, `sample_batch_size` at a time; image i is seeded with
    i, so the cache is reproducible and the same whichever process makes which batch."""
    from trainer.output import pipeline_from_parts

    cache.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_from_parts(parts, parts.denoiser, parts.text_encoders)
    done = 0
    while done < len(indices) and not should_stop():
        batch = indices[done : done + config.sample_batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(i) for i in batch]
        with torch.no_grad(), autocast():
            images = pipe(
                [config.class_prompt] * len(batch),
                num_inference_steps=config.class_inference_steps,
                height=config.resolution,
                width=config.resolution,
                generator=generators,
                **parts.family.sampling_kwargs(config),
            ).images
        for index, image in zip(batch, images, strict=True):
            # Written under a temporary name, then renamed: a killed run leaves no half image, and a full
            # disk removes it and names the image (trainer/atomic.py).
            with atomic.written(class_image_path(cache, index)) as tmp:
                image.save(tmp, format="PNG")
        done += len(batch)
        on_progress(done, len(indices))


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
    with atomic.written(cache / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
