"""The judge: a small CNN, trained on the toy world, that reads a picture's shape, colours and
background, and whose penultimate features stand in for DINO's in the DreamBooth paper.

    nice -n 15 python -m trainer.toyworld.judge --out trainer/assets/toy-judge.safetensors

It sees solid and split shapes of every combination (held-out ones included: it measures, it is
not the model under test), slightly blurred and noised so it reads generated images as well.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from trainer.toyworld.world import BACKGROUNDS, COLORS, IMAGE_SIZE, SHAPES, all_combos, random_scene, render_batch

JUDGE_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "toy-judge.safetensors"
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SPLIT_NAMES: tuple[str | None, ...] = (None, *COLORS)  # the right half's colour; None is solid
FEATURES = 128


@dataclass(frozen=True)
class Reading:
    shape: str
    color: str
    color2: str | None
    background: str

    @property
    def subject_key(self) -> tuple[str, str, str | None]:
        """What makes a subject itself: its shape and its colours, not where it stands."""
        return (self.shape, self.color, self.color2)


class JudgeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 16x16
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(), nn.Linear(128 * 16, FEATURES), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({
            "shape": nn.Linear(FEATURES, len(SHAPES)),
            "color": nn.Linear(FEATURES, len(COLOR_NAMES)),
            "color2": nn.Linear(FEATURES, len(SPLIT_NAMES)),
            "background": nn.Linear(FEATURES, len(BACKGROUND_NAMES)),
        })

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.body(x)
        return features, {name: head(features) for name, head in self.heads.items()}


def to_batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of any size -> [N, 3, 32, 32] in [-1, 1], as the judge and the VAE see them."""
    arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
                         if im.size != (IMAGE_SIZE, IMAGE_SIZE) else im.convert("RGB")) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Judge:
    """Deterministic readings and embeddings of images; load once, call many times."""

    def __init__(self, weights: Path = JUDGE_WEIGHTS) -> None:
        from safetensors.torch import load_file

        if not Path(weights).is_file():
            raise FileNotFoundError(f"No judge weights at {weights}: run `python -m trainer.toyworld.judge`.")
        self.net = JudgeNet()
        self.net.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
        self.net.eval()

    @torch.no_grad()
    def _run(self, images: list[Image.Image]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.net(to_batch(images))

    def read(self, images: list[Image.Image]) -> list[Reading]:
        _, logits = self._run(images)
        picks = {name: value.argmax(dim=1).tolist() for name, value in logits.items()}
        return [Reading(SHAPES[s], COLOR_NAMES[c], SPLIT_NAMES[c2], BACKGROUND_NAMES[b])
                for s, c, c2, b in zip(picks["shape"], picks["color"], picks["color2"], picks["background"],
                                       strict=True)]

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-length penultimate features [N, 128]: cosine similarity is a dot product."""
        features, _ = self._run(images)
        return F.normalize(features, dim=1)


def _labelled_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [random_scene(rng, all_combos(), split_fraction=0.4) for _ in range(size)]
    x = torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(size, 1, 1, 1, generator=gen)  # anything between sharp and a 3x3 box blur
    x = mix * blur + (1 - mix) * x + 0.06 * torch.rand(size, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    labels = {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
        "color": torch.tensor([COLOR_NAMES.index(s.color) for s in scenes]),
        "color2": torch.tensor([SPLIT_NAMES.index(s.color2) for s in scenes]),
        "background": torch.tensor([BACKGROUND_NAMES.index(s.background) for s in scenes]),
    }
    return x.clamp(-1, 1), labels


def train_judge(out: Path, steps: int = 1500, batch: int = 128, seed: int = 0) -> dict[str, float]:
    """Train, save fp16 safetensors to `out`, return accuracy per head on fresh scenes."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    rng, started = random.Random(seed), time.monotonic()
    for step in range(steps):
        x, labels = _labelled_batch(rng, batch)
        _, logits = net(x)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"judge step {step + 1}/{steps} loss {loss.item():.4f} {time.monotonic() - started:.0f}s", flush=True)
    net.eval()
    with torch.no_grad():
        x, labels = _labelled_batch(random.Random(seed + 999), 1000)
        _, logits = net(x)
        accuracy = {k: (logits[k].argmax(1) == labels[k]).float().mean().item() for k in labels}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(out))
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=JUDGE_WEIGHTS)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(train_judge(args.out, args.steps))


if __name__ == "__main__":
    main()
