"""How well the toy model follows prompts, read by the judge: per attribute, on held-out and on
training combinations, plus the VAE's own ceiling (the judge reading its reconstructions).

    nice -n 15 python -m trainer.toyworld.accuracy [--model trainer/assets/toy-sd] [--per-combo 4]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from trainer.toyworld.judge import Judge, to_batch
from trainer.toyworld.score import generate
from trainer.toyworld.world import Scene, held_out_combos, random_scene, render, train_combos

ATTRIBUTES: tuple[str, ...] = ("shape", "color", "background")


def prompt_accuracy(pipe, judge: Judge, combos: list[tuple[str, str, str]], per_combo: int = 4,
                    steps: int = 20, guidance: float = 5.0) -> dict[str, float]:
    """Fraction of generations whose judged shape / colour / background is the one prompted."""
    correct = dict.fromkeys(ATTRIBUTES, 0)
    for shape, color, background in combos:
        images = generate(pipe, Scene(shape, color, background).caption(), per_combo, steps, guidance)
        for reading in judge.read(images):
            correct["shape"] += reading.shape == shape
            correct["color"] += reading.color == color
            correct["background"] += reading.background == background
    return {k: round(v / (per_combo * len(combos)), 3) for k, v in correct.items()}


@torch.no_grad()
def vae_accuracy(vae, judge: Judge, count: int = 300, seed: int = 5) -> dict[str, float]:
    """The judge on VAE round trips of random scenes (split ones included): the VAE's ceiling."""
    from PIL import Image

    rng = random.Random(seed)
    scenes = [random_scene(rng, split_fraction=0.4) for _ in range(count)]
    x = to_batch([render(s) for s in scenes]).to(vae.dtype)
    out = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    pixels = ((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    readings = judge.read([Image.fromarray(p) for p in pixels])
    names = (*ATTRIBUTES, "color2")
    return {k: round(sum(getattr(r, k) == getattr(s, k) for r, s in zip(readings, scenes, strict=True)) / count, 3)
            for k in names}


def main(argv: list[str] | None = None) -> dict:
    from diffusers import StableDiffusionPipeline

    from trainer.toyworld import TOY_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TOY_MODEL_DIR)
    parser.add_argument("--per-combo", type=int, default=4)
    parser.add_argument("--train-combos", type=int, default=20, help="Training combinations sampled (seeded).")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    judge = Judge()
    seen = random.Random(0).sample(train_combos(), args.train_combos)
    results = {
        "held_out": prompt_accuracy(pipe, judge, held_out_combos(), args.per_combo, guidance=args.guidance),
        "train": prompt_accuracy(pipe, judge, seen, args.per_combo, guidance=args.guidance),
        "vae_round_trip": vae_accuracy(pipe.vae, judge),
    }
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
