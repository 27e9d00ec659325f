"""Scores of the base model and of each checkpoint, as the DreamBooth paper measures them (Ruiz et
al. 2022, section 4.1), on fixed seeds, so two checkpoints are compared on the same noise:

- subject fidelity: samples of the instance prompt against the user's photos, mean cosine similarity
  of DINO image embeddings (`subject`; CLIP image embeddings as `subject_clip`, the paper's CLIP-I);
- prompt fidelity: samples of recontextualisation prompts built from the class noun ("… on the beach",
  "… in the snow", "a painting of …") against those prompts without the identifier, CLIP text-image
  similarity (`prompt`, CLIP-T);
- class drift: the class prompt alone, the base model's samples and this checkpoint's on the same seeds:
  `drift` is the share of samples that look like the subject now and did not under the base model
  (zero for the base model itself), `div_kept` the class samples' diversity (mean pairwise DINO
  distance) as a fraction of the base model's;
- memorisation: the highest similarity of any subject or recontext sample to its nearest training
  photo, with `memorised` set above a threshold calibrated on the photos themselves (see
  `memorisation_threshold`).

The embedders load through transformers like the base model (safetensors only, no remote code); a base
model can have its own registered instead (`register_embedders`: the toy world's judge, trainer/toyworld/score.py,
for the toy model), and when none can be loaded the run goes on with "Scores unavailable: why".
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from trainer.config import TrainConfig
from trainer.families.base import first_line

SCORES_NAME = "scores.jsonl"
CLASS_SEED = 1000  # class-prompt samples use seeds 1000.., the others 0..: no two prompts share noise
# A sample this far from the photos' own nearest-other-photo similarity towards 1 (an exact copy) is a copy.
# Calibrated on the toy world's example (bench/memorisation_threshold.py): at 0.9, 100% of copies of a
# training photo are flagged, 2% of new photos of the subject on the same backgrounds, 0% in new contexts
# (at 0.5: 100%, 35%, 0%).
COPY_FRACTION = 0.9
NO_PAIR_THRESHOLD = 0.9  # with a single photo there is no pair to calibrate on


class ScoresUnavailable(Exception):
    """The embedders could not be loaded; the message says why."""


class Embedders(Protocol):
    """What the scores need from the embedding models."""

    label: str

    def subject(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length subject embeddings [N, D] (DINO's role): cosine similarity is a dot product."""

    def clip_image(self, images: Sequence[Image.Image]) -> torch.Tensor | None:
        """Unit-length CLIP image embeddings, or None when the embedders have none."""

    def prompt_match(self, images: Sequence[Image.Image], text: str) -> torch.Tensor:
        """How well each image shows `text`: [N]."""

    def recontext(self, identifier: str, noun: str, photos: Sequence[Image.Image]) -> list[tuple[str, str]]:
        """(prompt to sample, text to score the samples against) for each recontextualisation."""

    def looks_like_subject(self, images: Sequence[Image.Image], photos: Sequence[Image.Image]) -> list[bool] | None:
        """Which images show the subject, where the embedders can tell; None: decided by similarity."""


class HubEmbedders:
    """A DINOv2 for subject fidelity and a CLIP for prompt fidelity and CLIP-I, loaded with `from_pretrained`
    (a Hub id or a folder) with their image processors' PIL backend (no torchvision needed), on the CPU."""

    def __init__(self, image_model: str, clip_model: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        self.label = f"{_short(image_model)} + {_short(clip_model)}"
        self.dino = AutoModel.from_pretrained(image_model, use_safetensors=True).eval()
        self.dino_processor = AutoImageProcessor.from_pretrained(image_model, backend="pil")
        self.clip = CLIPModel.from_pretrained(clip_model, use_safetensors=True).eval()
        self.clip_processor = AutoImageProcessor.from_pretrained(clip_model, backend="pil")
        self.tokenizer = AutoTokenizer.from_pretrained(clip_model)

    @staticmethod
    def _pixels(processor, images: Sequence[Image.Image]) -> torch.Tensor:
        return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def subject(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = self.dino(pixel_values=self._pixels(self.dino_processor, images))
        return F.normalize(out.pooler_output.float(), dim=-1)  # DINOv2's pooled output: the normed CLS token

    @torch.no_grad()
    def clip_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=self._pixels(self.clip_processor, images))
        return F.normalize(_features(out).float(), dim=-1)

    @torch.no_grad()
    def prompt_match(self, images: Sequence[Image.Image], text: str) -> torch.Tensor:
        tokens = self.tokenizer([text], padding=True, truncation=True, return_tensors="pt")
        text_embedding = F.normalize(_features(self.clip.get_text_features(**tokens)).float(), dim=-1)
        return (self.clip_image(images) @ text_embedding.T).squeeze(1)

    def recontext(self, identifier: str, noun: str, photos: Sequence[Image.Image]) -> list[tuple[str, str]]:
        return [(f"a {identifier} {noun} on the beach", f"a {noun} on the beach"),
                (f"a {identifier} {noun} in the snow", f"a {noun} in the snow"),
                (f"a painting of a {identifier} {noun}", f"a painting of a {noun}")]

    def looks_like_subject(self, images: Sequence[Image.Image], photos: Sequence[Image.Image]) -> None:
        return None


def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected features as an output's pooler_output; 4 returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _short(model: str) -> str:
    return Path(model).name if Path(model).is_dir() else model.split("/")[-1]


def memorisation_threshold(photos: torch.Tensor) -> float:
    """The similarity above which a sample counts as a copy of a training photo: COPY_FRACTION of the way from
    the highest similarity between two different photos (what a new photo of the subject reaches) to 1 (an
    exact copy)."""
    n = photos.shape[0]
    if n < 2:
        return NO_PAIR_THRESHOLD
    sims = photos @ photos.T
    nearest_other = float((sims - 2 * torch.eye(n)).max())
    return nearest_other + COPY_FRACTION * (1.0 - nearest_other)


def diversity(embeddings: torch.Tensor) -> float:
    """Mean 1 - cosine similarity over all distinct pairs (the paper's DIV, with DINO in LPIPS' place)."""
    n = embeddings.shape[0]
    return float((1 - embeddings @ embeddings.T).sum() / (n * (n - 1))) if n > 1 else 0.0


@dataclass(frozen=True)
class BaseReference:
    """What a checkpoint's class samples are compared with: the base model's, on the same seeds."""

    class_looks: tuple[bool, ...]  # sample i looked like the subject under the base model
    class_similarity: float  # the base class samples' mean similarity to the photos
    div: float


def generate(pipe, prompt: str, count: int, seed: int, steps: int, guidance: float, size: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             batch: int = 1) -> list[Image.Image]:
    """`count` images of `prompt`, image i from seed `seed + i`: every model gets the same noise. `batch` at a time:
    1 on a GPU, as validation samples are drawn (scoring then needs no more accelerator memory than they do);
    all of them on the CPU, where batching halves the time and memory is the system's."""
    images: list[Image.Image] = []
    for first in range(0, count, batch):
        seeds = range(seed + first, seed + min(first + batch, count))
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with torch.no_grad(), autocast():
            images += pipe([prompt] * len(generators), num_inference_steps=steps, guidance_scale=guidance,
                           generator=generators, height=size, width=size).images
    return images


def draw_batch(config: TrainConfig, device_type: str) -> int:
    """Images `generate` draws at once: 1 on a GPU (no more accelerator memory than a validation sample), a
    prompt's all on the CPU (twice as fast; the memory is the system's)."""
    return 1 if device_type == "cuda" else config.score_samples


class Scorer:
    """Scores pipelines against one subject; the first one scored (or `base` given) is the base model."""

    def __init__(self, embedders: Embedders, photos: Sequence[Image.Image], config: TrainConfig,
                 base: BaseReference | None = None, batch: int = 1) -> None:
        self.embedders, self.photos, self.config, self.base = embedders, list(photos), config, base
        self.batch = batch  # images drawn at once (see `generate`)
        self.photo_embeddings = embedders.subject(self.photos)
        self.photo_clip = embedders.clip_image(self.photos)
        self.threshold = memorisation_threshold(self.photo_embeddings)
        noun = config.class_noun
        self.subject_prompt = config.instance_prompt
        self.recontext = embedders.recontext(config.identifier.strip(), noun, self.photos)
        self.class_prompt = config.class_prompt or f"a photo of a {noun}"
        n = self.photo_embeddings.shape[0]
        sims = self.photo_embeddings @ self.photo_embeddings.T
        self.photo_mutual = float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1))) if n > 1 else 1.0
        self.subject_images: list[Image.Image] = []  # what the last pipeline scored drew of the instance prompt

    @property
    def images_per_checkpoint(self) -> int:
        return self.config.score_samples * (2 + len(self.recontext))

    def _generate(self, pipe, prompt: str, seed: int, autocast) -> list[Image.Image]:
        c = self.config
        return generate(pipe, prompt, c.score_samples, seed, c.score_inference_steps, c.validation_guidance_scale,
                        c.resolution, autocast, self.batch)

    def _looks(self, images: list[Image.Image], similarity: torch.Tensor) -> list[bool]:
        decided = self.embedders.looks_like_subject(images, self.photos)
        if decided is not None:
            return decided
        # Halfway between what the base model's class samples reach and what the photos reach among themselves.
        base_level = float(similarity.mean()) if self.base is None else self.base.class_similarity
        line = (base_level + self.photo_mutual) / 2
        return [bool(s > line) for s in similarity]

    def score(self, pipe, step: int, autocast=contextlib.nullcontext,
              progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, object]:
        """The scores of `pipe` as one row of scores.jsonl; the first pipeline scored becomes the base."""
        started = time.monotonic()
        jobs = 2 + len(self.recontext)
        own = self.subject_images = self._generate(pipe, self.subject_prompt, 0, autocast)
        progress(1, jobs)
        own_embeddings = self.embedders.subject(own)
        own_similarity = own_embeddings @ self.photo_embeddings.T
        per_sample = own_similarity.mean(dim=1)
        subject, subject_se = float(per_sample.mean()), _standard_error(per_sample)
        subject_clip = None
        if self.photo_clip is not None:
            subject_clip = float((self.embedders.clip_image(own) @ self.photo_clip.T).mean())
        matches, in_context, nearest = [], [], [float(own_similarity.max())]
        for k, (prompt, text) in enumerate(self.recontext):
            images = self._generate(pipe, prompt, 0, autocast)
            matches.append(self.embedders.prompt_match(images, text).float())
            similarity = self.embedders.subject(images) @ self.photo_embeddings.T
            in_context.append(similarity.mean(dim=1))
            nearest.append(float(similarity.max()))
            progress(2 + k, jobs)
        match = torch.cat(matches) if matches else torch.zeros(1)
        prompt_fidelity, prompt_se = float(match.mean()), _standard_error(match)

        classes = self._generate(pipe, self.class_prompt, CLASS_SEED, autocast)
        progress(jobs, jobs)
        class_embeddings = self.embedders.subject(classes)
        class_similarity = (class_embeddings @ self.photo_embeddings.T).mean(dim=1)
        looks, div = self._looks(classes, class_similarity), diversity(class_embeddings)
        row: dict[str, object] = {"step": step}
        if self.base is None:
            self.base = BaseReference(tuple(looks), float(class_similarity.mean()), div)
            row.update(base=True, class_looks=list(looks), class_similarity=round(self.base.class_similarity, 4),
                       div=round(div, 4))
        # Sample i against the base model's sample i (a resumed run may score more or fewer of them).
        paired = min(len(looks), len(self.base.class_looks))
        drifted = sum(now and not before for now, before in zip(looks[:paired], self.base.class_looks[:paired],
                                                                 strict=True))
        memorisation = max(nearest)
        # The subject in the new contexts: prompt fidelity alone is also met by drawing the context without it.
        context = float(torch.cat(in_context).mean()) if in_context else None
        row.update(subject=round(subject, 4), subject_se=round(subject_se, 4),
                   subject_in_context=None if context is None else round(context, 4),
                   subject_clip=None if subject_clip is None else round(subject_clip, 4),
                   prompt=round(prompt_fidelity, 4), prompt_se=round(prompt_se, 4), drift=round(drifted / max(paired, 1), 4),
                   div_kept=round(div / self.base.div, 4) if self.base.div else None,
                   memorisation=round(memorisation, 4), memorised=memorisation >= self.threshold,
                   memorisation_threshold=round(self.threshold, 4), scored_with=self.embedders.label,
                   seconds=round(time.monotonic() - started, 2))
        return row


def _standard_error(values: torch.Tensor) -> float:
    """The sampling noise of a mean over `values` (the pick rule allows for it: trainer/scores/pick.py)."""
    return float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0


def base_reference(rows: Sequence[dict]) -> BaseReference | None:
    """The base model's reference from its row of scores.jsonl (None when the base was not scored)."""
    for row in rows:
        if row.get("base"):
            return BaseReference(tuple(bool(x) for x in row["class_looks"]), float(row["class_similarity"]),
                                 float(row["div"]))
    return None


# Embedders of particular base models, by the model's folder (resolved): a world of its own registers the judge
# that reads its pictures (trainer/toyworld/score.py registers the toy judge for the toy model when imported).
MODEL_EMBEDDERS: dict[Path, Callable[[], Embedders]] = {}


def register_embedders(model_dir: Path, factory: Callable[[], Embedders]) -> None:
    """Score runs of the model in `model_dir` with `factory()`'s embedders instead of the configured Hub models."""
    MODEL_EMBEDDERS[Path(model_dir).resolve()] = factory


def load_embedders(config: TrainConfig) -> Embedders:
    """The embedders registered for the base model, else the configured Hub models (on the CPU: a few seconds per
    checkpoint for ~20 images, and no accelerator memory taken from the training); ScoresUnavailable says why not."""
    factory = MODEL_EMBEDDERS.get(Path(config.pretrained_model).resolve())
    if factory is not None:
        return factory()
    try:
        return HubEmbedders(config.score_image_model, config.score_clip_model)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise ScoresUnavailable(f"could not load {config.score_image_model} and {config.score_clip_model} "
                                f"({first_line(err)})") from err


# --- scores.jsonl -----------------------------------------------------------------------------
def scores_path(run_dir: Path) -> Path:
    return Path(run_dir) / SCORES_NAME


def read_scores(run_dir: Path) -> list[dict]:
    """The rows of a run's scores.jsonl, oldest first; the last row of a step wins (a resumed run rescored it).
    A line cut short by a kill is skipped."""
    path = scores_path(run_dir)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def append_scores(run_dir: Path, row: dict) -> None:
    with scores_path(run_dir).open("a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")
