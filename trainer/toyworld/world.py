"""The toy world: seeded little pictures of coloured shapes on plain backgrounds, with captions.

Every image is fully described by a `Scene` (shape, colour, optional second colour, background,
size, position), so the same scene always renders to the same pixels and a caption can be read
off it. Shapes are drawn 4x larger and shrunk, which gives them soft, anti-aliased edges.

A "split" scene paints the left half of the shape in `color` and the right half in `color2`:
the base model is never pretrained on such captions, which is what makes a split shape a subject
it cannot draw from text alone (see example.py). The VAE and the judge do see split shapes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (150, 50, 190),
    "orange": (245, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (130, 130, 130),
    "blue": (40, 80, 225),
    "green": (30, 170, 60),
}
IMAGE_SIZE = 32
SUPERSAMPLE = 4
HELD_OUT_COUNT = 20  # (shape, colour, background) combinations never shown to the base model


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    color2: str | None = None  # None: solid; else the right half's colour
    scale: float = 0.36  # shape radius as a fraction of the image side
    dx: float = 0.0  # centre offset, fraction of the image side
    dy: float = 0.0

    def caption(self, with_color: bool = True, with_background: bool = True) -> str:
        noun = f"{self.color} {self.shape}" if with_color else self.shape
        where = f" on a {self.background} background" if with_background else ""
        return f"a photo of a {noun}{where}"


def all_combos() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) whose shape stays visible (colour != background)."""
    return [(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS if c != b]


def held_out_combos() -> list[tuple[str, str, str]]:
    """A fixed, seeded set of combinations kept out of pretraining, to test composition."""
    return sorted(random.Random(1234).sample(all_combos(), HELD_OUT_COUNT))


def train_combos() -> list[tuple[str, str, str]]:
    held = set(held_out_combos())
    return [c for c in all_combos() if c not in held]


def random_scene(rng: random.Random, combos: list[tuple[str, str, str]] | None = None,
                 split_fraction: float = 0.0) -> Scene:
    """A random scene: a combination from `combos` (default: all), random size and position."""
    shape, color, background = rng.choice(combos or all_combos())
    color2 = None
    if rng.random() < split_fraction:
        color2 = rng.choice([c for c in COLORS if c not in (color, background)])
    scale = rng.uniform(0.28, 0.42)
    room = 0.48 - scale  # keep the shape inside the frame
    return Scene(shape, color, background, color2, scale, rng.uniform(-room, room), rng.uniform(-room, room))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * k)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r * 0.33, r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    raise ValueError(f"`shape` has to be one of {SHAPES} but is {shape!r}.")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the scene as an RGB image of `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = big * (0.5 + scene.dx), big * (0.5 + scene.dy), big * scene.scale
    if scene.shape == "circle":
        draw.ellipse((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=255)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=255)
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    image.paste(COLORS[scene.color], (0, 0, big, big), mask)
    if scene.color2 is not None:
        right = mask.copy()
        ImageDraw.Draw(right).rectangle((0, 0, round(cx) - 1, big), fill=0)
        image.paste(COLORS[scene.color2], (0, 0, big, big), right)
    return image.resize((size, size), Image.Resampling.BOX)


def render_batch(scenes: list[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """Scenes as a uint8 array [N, size, size, 3]."""
    return np.stack([np.asarray(render(s, size)) for s in scenes])


# Caption templates: varied, so the text encoder must read every word rather than count positions.
# "a photo of red star" matters most: it makes the slot before the noun a colour slot, which is
# where DreamBooth's "a photo of sks star" puts its identifier.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {noun}{where}",
    "a photo of {noun}{where}",
    "a {noun}{where}",
    "{noun}{where}",
    "a picture of a {noun}{where}",
)


def caption_for_training(scene: Scene, rng: random.Random) -> str:
    """A caption in a random template with attributes sometimes left out, so "a photo of a star"
    means any star, and an empty caption 10% of the time, which classifier-free guidance needs."""
    if rng.random() < 0.1:
        return ""
    noun = f"{scene.color} {scene.shape}" if rng.random() > 0.25 else scene.shape
    where = f" on a {scene.background} background" if rng.random() > 0.25 else ""
    return rng.choice(TEMPLATES).format(noun=noun, where=where)
