"""Training batches: which images a step sees, their latents and prompt embeddings.

Everything random here (data order, crops, flips, the VAE's latent sample, noise, timesteps)
is drawn from generators seeded by (seed, sample), never from global state: a run resumed at
step k sees exactly the batches an uninterrupted run sees.

A sample is one row of the global batch, numbered across the whole run: optimizer step s holds
samples s·G … s·G + G − 1, G = batch per process × processes × accumulation. Process r of W takes,
in micro-batch m, samples (m·W + r)·b … + b − 1. So 1 process × batch 2, 2 processes × batch 1 and
1 process × batch 1 × accumulation 2 see the same rows with the same noise, and a checkpoint written
by N processes resumes on M: the next sample is all a resume needs (`resume_at`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainer.config import TrainConfig
from trainer.data.photos import ImageSet, prepare_image_and_crop
from trainer.families import Components, Conditioning

# Random streams drawn from per sample: noise and timestep of its instance row and of its class row,
# the crop, flip and latent sample of each, and the epoch's data order (indexed by epoch instead).
NOISE_STREAM, BATCH_STREAM, ORDER_STREAM, CLASS_NOISE_STREAM, CLASS_BATCH_STREAM = 0, 1, 2, 3, 4


def step_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of one random stream at one sample (or epoch); a pure function of its arguments.

    This is what makes resume exact: a run restarted at step k draws the same numbers an
    uninterrupted run draws at step k, with no generator state to save. Streams (< 7) never
    collide within a sample, and the large prime keeps runs of different seeds apart for
    any practical number of samples. Changing this changes every run's randomness.
    """
    return seed * 1_000_003 + index * 7 + stream


def step_generator(seed: int, index: int, salt: int = NOISE_STREAM) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(step_seed(seed, index, salt))


@dataclass
class Batch:
    latents: torch.Tensor  # instance rows first, then class rows
    input_ids: torch.Tensor  # token ids of each row's prompt
    n_instance: int
    # Per row: original height, width, crop top, left, target height, width (SDXL's time ids).
    image_info: torch.Tensor
    noise_generators: list[torch.Generator]  # per row, seeded by its sample: noise and timestep
    images: list[int]  # per instance row, the index of its photo (logged: which process saw what)


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
        self.global_batch = config.train_batch_size * num_processes * config.gradient_accumulation_steps
        self.step_base, self.sample_base = 0, 0  # where this process's count of samples starts
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

    def prompt_ids(self) -> list[torch.Tensor]:
        """The token ids of every prompt a batch can hold: each photo's, and the class prompt's."""
        return self.instance_ids + ([self.class_ids] if self.class_ids is not None else [])

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
    def resume_at(self, step: int, samples_seen: int | None) -> None:
        """Continue after `step` optimizer steps that took `samples_seen` samples (None: this run's own
        global batch throughout). A checkpoint from another number of processes continues the same
        data order and noise from its next sample."""
        self.step_base = step
        self.sample_base = step * self.global_batch if samples_seen is None else samples_seen

    def samples_seen(self, step: int) -> int:
        """How many samples the run has taken after `step` optimizer steps (kept in checkpoints)."""
        return self.sample_base + (step - self.step_base) * self.global_batch

    def sample_index(self, step: int, micro: int, row: int) -> int:
        size = self.config.train_batch_size
        return self.samples_seen(step) + (micro * self.world + self.rank) * size + row

    def batch(self, step: int, micro: int = 0) -> Batch:
        """This process's share of micro-batch `micro` of optimizer step `step`."""
        seed = self.config.seed
        latents, ids, infos, gens, images = [], [], [], [], []
        class_latents, class_ids, class_infos, class_gens = [], [], [], []
        for row in range(self.config.train_batch_size):
            sample = self.sample_index(step, micro, row)
            epoch, offset = divmod(sample, self.epoch_len)
            order = torch.randperm(self.epoch_len, generator=step_generator(seed, epoch, salt=ORDER_STREAM))
            position = int(order[offset])
            image = position % len(self.instance)
            latent, info = self._latent("instance", self.instance, image,
                                        step_generator(seed, sample, salt=BATCH_STREAM))
            latents.append(latent)
            infos.append(info)
            ids.append(self.instance_ids[image])
            gens.append(step_generator(seed, sample, salt=NOISE_STREAM))
            images.append(image)
            if self.classes is not None:
                latent, info = self._latent("class", self.classes, position % len(self.classes),
                                            step_generator(seed, sample, salt=CLASS_BATCH_STREAM))
                class_latents.append(latent)
                class_infos.append(info)
                class_ids.append(self.class_ids)
                class_gens.append(step_generator(seed, sample, salt=CLASS_NOISE_STREAM))
        return Batch(
            latents=torch.cat(latents + class_latents).to(self.device),
            input_ids=torch.stack(ids + class_ids).to(self.device),
            n_instance=len(latents),
            image_info=torch.stack(infos + class_infos).to(self.device),
            noise_generators=gens + class_gens,
            images=images,
        )


class PromptEmbeddings:
    """The conditioning of each prompt, computed once while the text encoder is frozen."""

    def __init__(self, parts: Components) -> None:
        self.parts = parts
        self._cache: dict[bytes, Conditioning] = {}

    def fill(self, input_ids: Sequence[torch.Tensor], device: torch.device) -> None:
        """Cache every prompt a step can draw now, so that the text encoders can leave the device
        (trainer/memory/parking.py)."""
        self.cached(torch.stack(list(input_ids)).to(device))

    @torch.no_grad()
    def cached(self, input_ids: torch.Tensor) -> Conditioning:
        rows = []
        for row in input_ids:
            key = row.cpu().numpy().tobytes()
            if key not in self._cache:
                self._cache[key] = self.parts.family.encode(self.parts, row[None])
            rows.append(self._cache[key])
        return Conditioning.cat(rows)
