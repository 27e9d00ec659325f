"""Where the memorisation warning's threshold sits (trainer/scores/measure.py, memorisation_threshold), measured on
the toy world's example subject with the judge's embeddings (DINO's stand-in):

- copies: each training photo as a generation would return it (32 px, lightly blurred and noised);
- new photos: the same subject (shape and colours) on the same backgrounds, at other sizes and places;
- new contexts: the same subject on backgrounds it was never photographed on.

    python bench/memorisation_threshold.py

Prints each group's nearest-training-photo similarity (min / median / max) beside the threshold: a good
threshold is above every new photo and below every copy.
"""

from __future__ import annotations

import random
import statistics

import numpy as np
from PIL import Image, ImageFilter

from trainer.scores.measure import COPY_FRACTION, memorisation_threshold
from trainer.toyworld.example import EXAMPLE_IMAGE_SIZE, EXAMPLE_SCENES
from trainer.toyworld.judge import Judge
from trainer.toyworld.world import BACKGROUNDS, IMAGE_SIZE, Scene, render

VARIANTS = 40


def as_generated(image: Image.Image, rng: random.Random) -> Image.Image:
    """What a model that reproduces a photo draws: its pixels at 32 px, softened, with a little noise."""
    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(0.6))
    pixels = np.asarray(small).astype(np.float32) + np.random.default_rng(rng.randrange(2**31)).normal(0, 4, (32, 32, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def moved(scene: Scene, rng: random.Random, background: str | None = None) -> Scene:
    return Scene(scene.shape, scene.color, background or scene.background, scene.color2,
                 scale=rng.uniform(0.28, 0.42), dx=rng.uniform(-0.1, 0.1), dy=rng.uniform(-0.1, 0.1))


def main() -> None:
    rng = random.Random(0)
    judge = Judge()
    photos = [render(scene, EXAMPLE_IMAGE_SIZE) for scene in EXAMPLE_SCENES]
    photo_embeddings = judge.embed(photos)
    threshold = memorisation_threshold(photo_embeddings)

    def nearest(images: list[Image.Image]) -> list[float]:
        return (judge.embed(images) @ photo_embeddings.T).max(dim=1).values.tolist()

    seen = {scene.background for scene in EXAMPLE_SCENES} | {"yellow", "purple"}
    groups = {
        "copies of a training photo": nearest([as_generated(photos[i % len(photos)], rng) for i in range(VARIANTS)]),
        "new photos, same backgrounds": nearest([render(moved(EXAMPLE_SCENES[i % len(EXAMPLE_SCENES)], rng))
                                                 for i in range(VARIANTS)]),
        "new contexts (new backgrounds)": nearest([render(moved(EXAMPLE_SCENES[0], rng, b))
                                                   for b in BACKGROUNDS if b not in seen for _ in range(VARIANTS // 2)]),
    }
    nearest_other = (threshold - COPY_FRACTION) / (1 - COPY_FRACTION)
    candidates = (0.5, 0.75, 0.9, 0.95)
    print(f"photos' nearest other photo {nearest_other:.3f}; threshold = that + fraction x (1 - that); "
          f"the engine's fraction {COPY_FRACTION} gives {threshold:.3f}")
    print(f"{'group':34}{'min':>8}{'median':>8}{'max':>8}" + "".join(f"{f'>= {f}':>10}" for f in candidates))
    for name, sims in groups.items():
        flagged = [sum(s >= nearest_other + f * (1 - nearest_other) for s in sims) / len(sims) for f in candidates]
        print(f"{name:34}{min(sims):8.3f}{statistics.median(sims):8.3f}{max(sims):8.3f}"
              + "".join(f"{x:10.0%}" for x in flagged))


if __name__ == "__main__":
    main()
