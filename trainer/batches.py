"""Training batches: which images a step sees, their latents and prompt embeddings.

Everything random here (data order, crops, flips, the VAE's latent sample, noise, timesteps)
is drawn from generators seeded by (seed, micro-step), never from global state: a run resumed
at step k sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import TrainConfig
from .data import ImageSet, prepare_image_and_crop
from .families import Components, Conditioning

# Random streams drawn from per micro-step: 0 noise and timesteps, 1 the batch's crops, flips and
# latent samples, 2 the epoch's data order (indexed by epoch instead of micro-step).
NOISE_STREAM, BATCH_STREAM, ORDER_STREAM = 0, 1, 2


def micro_step_index(step: int, accumulation: int, micro: int) -> int:
    """The global index of micro-batch `micro` of optimizer step `step`: what every draw is keyed by."""
    return step * accumulation + micro


def step_seed(seed: int, micro_step: int, stream: int = 0) -> int:
    """The seed of one random stream at one micro-step; a pure function of its arguments.

    This is what makes resume exact: a run restarted at step k draws the same numbers an
    uninterrupted run draws at step k, with no generator state to save. Streams (< 7) never
    collide within a micro-step, and the large prime keeps runs of different seeds apart for
    any practical number of micro-steps. Changing this changes every run's randomness.
    """
    return seed * 1_000_003 + micro_step * 7 + stream


def step_generator(seed: int, micro_step: int, salt: int = NOISE_STREAM) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, micro_step, salt))


@dataclass
class Batch:
    latents: torch.Tensor  # instance rows first, then class rows
    input_ids: torch.Tensor  # token ids of each row's prompt
    n_instance: int
    # Per row: original height, width, crop top, left, target height, width (SDXL's time ids).
    image_info: torch.Tensor


class BatchSource:
    """Instance (and class) images, with latents cached once when nothing augments them."""

    def __init__(
        self,
        config: TrainConfig,
        parts: Components,
        instance: ImageSet,
        classes: ImageSet | None,
        device: torch.device,
        process_index: int = 0,
        num_processes: int = 1,
        instance_prompts: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.parts = parts
        self.instance = instance
        self.classes = classes
        self.device = device
        self.rank, self.world = process_index, num_processes
        # One epoch covers every instance image and every class image at least once.
        self.epoch_len = max(len(instance), len(classes) if classes else 0)
        # Each instance image's prompt: its caption file's text, else the instance prompt.
        prompts = instance_prompts or [config.instance_prompt] * len(instance)
        self.instance_ids = [self._tokenize(p) for p in prompts]
        self.class_ids = self._tokenize(config.class_prompt) if classes else None
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._crops: dict[str, list[tuple[int, int]]] = {}  # the crop each cached latent was taken from

    def _tokenize(self, prompt: str) -> torch.Tensor:
        return self.parts.family.tokenize(self.parts, prompt)

    # --- latents ----------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.parts.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def cache_latents(self, on_progress: Callable[[int, int], None]) -> None:
        """Encode each image once: the VAE encode is a third of a 512-px step's compute."""
        sets = [("instance", self.instance)] + ([("class", self.classes)] if self.classes else [])
        total = sum(len(s) for _, s in sets)
        done = 0
        for name, images in sets:
            means, stds, crops = [], [], []
            for i in range(len(images)):
                pixels, crop = prepare_image_and_crop(images.image(i), self.config.resolution, True, False)
                mean, std = self._encode(pixels[None])
                means.append(mean)
                stds.append(std)
                crops.append(crop)
                done += 1
                on_progress(done, total)
            self._moments[name] = (torch.cat(means), torch.cat(stds))
            self._crops[name] = crops

    def _latent(self, name: str, images: ImageSet, index: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A latent of image `index`, and its (original size, crop, target size) row."""
        if name in self._moments:
            mean, std = (t[index : index + 1] for t in self._moments[name])
            crop = self._crops[name][index]
        else:
            crop_rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
            flip = self.config.random_flip and bool(torch.rand((), generator=gen) < 0.5)
            pixels, crop = prepare_image_and_crop(images.image(index), self.config.resolution,
                                                  self.config.center_crop, flip, crop_rng)
            mean, std = self._encode(pixels[None])
        # Sampling the latent distribution each step, as encoding each step would.
        eps = torch.randn(mean.shape, generator=gen).to(mean.device)
        latent = mean + std * eps
        vae_cfg = self.parts.vae.config
        shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        size = self.config.resolution
        info = torch.tensor([*images.original_size(index), *crop, size, size], dtype=torch.float32)
        return (latent - shift) * vae_cfg.scaling_factor, info

    # --- batches ----------------------------------------------------------------------
    def batch(self, micro_step: int) -> Batch:
        size = self.config.train_batch_size
        gen = step_generator(self.config.seed, micro_step, salt=BATCH_STREAM)
        latents, ids, infos, class_latents, class_ids, class_infos = [], [], [], [], [], []
        for j in range(size):
            sample = (micro_step * self.world + self.rank) * size + j
            epoch, offset = divmod(sample, self.epoch_len)
            order = torch.randperm(self.epoch_len, generator=step_generator(self.config.seed, epoch, salt=ORDER_STREAM))
            position = int(order[offset])
            latent, info = self._latent("instance", self.instance, position % len(self.instance), gen)
            latents.append(latent)
            infos.append(info)
            ids.append(self.instance_ids[position % len(self.instance)])
            if self.classes is not None:
                latent, info = self._latent("class", self.classes, position % len(self.classes), gen)
                class_latents.append(latent)
                class_infos.append(info)
                class_ids.append(self.class_ids)
        return Batch(
            latents=torch.cat(latents + class_latents).to(self.device),
            input_ids=torch.stack(ids + class_ids).to(self.device),
            n_instance=size,
            image_info=torch.stack(infos + class_infos).to(self.device),
        )


class PromptEmbeddings:
    """The conditioning of each prompt, computed once while the text encoder is frozen."""

    def __init__(self, parts: Components) -> None:
        self.parts = parts
        self._cache: dict[bytes, Conditioning] = {}

    @torch.no_grad()
    def cached(self, input_ids: torch.Tensor) -> Conditioning:
        rows = []
        for row in input_ids:
            key = row.cpu().numpy().tobytes()
            if key not in self._cache:
                self._cache[key] = self.parts.family.encode(self.parts, row[None])
            rows.append(self._cache[key])
        return Conditioning.cat(rows)
