"""DreamBooth's measures, read by the judge instead of DINO and CLIP (Ruiz et al., section 4.1).

- subject fidelity: generations of "a photo of sks star" against the real subject images: the mean
  cosine similarity of judge embeddings (DINO's role) and the fraction the judge reads as the subject
  (same shape and colours as the majority reading of the real images);
- prompt fidelity: "... on a blue background" and the like: the fraction on the asked background,
  and the fraction that is still the subject;
- prior preservation: "a photo of a star" alone: PRES, the fraction read as the subject (lower is
  better), DIV, the mean pairwise embedding distance (higher is more diverse), and the fraction
  that is the class at all.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from trainer.scores import measure as scores
from trainer.toyworld import TOY_MODEL_DIR
from trainer.toyworld.judge import Judge
from trainer.toyworld.world import BACKGROUNDS, IMAGE_SIZE

SCORE_NAMES: dict[str, str] = {
    "subject_similarity": "subject sim",
    "subject_accuracy": "subject acc",
    "prompt_fidelity": "prompt fid",
    "recontext_subject": "recontext subj",
    "pres": "PRES",
    "div": "DIV",
    "class_accuracy": "class acc",
}


@dataclass(frozen=True)
class Scores:
    subject_similarity: float
    subject_accuracy: float
    prompt_fidelity: float
    recontext_subject: float
    pres: float
    div: float
    class_accuracy: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Subject:
    """The real images and how to prompt for them."""

    images: list[Image.Image]
    identifier: str
    class_noun: str

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.identifier} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_noun}"


def generate(pipe, prompt: str, count: int, steps: int = 20, guidance: float = 5.0, seed: int = 0) -> list[Image.Image]:
    """`count` images of one prompt at the world's size, drawn together; image i is seeded with seed + i, so every
    model gets the same noise (trainer/scores/measure.py `generate`)."""
    return scores.generate(pipe, prompt, count, seed, steps, guidance, IMAGE_SIZE, batch=count)


def recontext_backgrounds(judge: Judge, subject: Subject) -> list[str]:
    """Backgrounds the subject was never shown on and that do not share its colours."""
    readings = judge.read(subject.images)
    seen = {r.background for r in readings} | {r.color for r in readings} | {r.color2 for r in readings}
    return [b for b in BACKGROUNDS if b not in seen]


def _subject_key(judge: Judge, images: list[Image.Image]) -> tuple[str, str, str | None]:
    return Counter(r.subject_key for r in judge.read(images)).most_common(1)[0][0]


def score(pipe, judge: Judge, subject: Subject, count: int = 16, steps: int = 20, guidance: float = 5.0) -> Scores:
    """All measures for one pipeline; deterministic for a given model, subject and settings."""
    key = _subject_key(judge, subject.images)
    real = judge.embed(subject.images)

    own = generate(pipe, subject.instance_prompt, count, steps, guidance)
    own_similarity = float((judge.embed(own) @ real.T).mean())
    own_accuracy = sum(r.subject_key == key for r in judge.read(own)) / count

    on_background, still_subject, total = 0, 0, 0
    for background in recontext_backgrounds(judge, subject):
        images = generate(pipe, f"{subject.instance_prompt} on a {background} background", count, steps, guidance)
        for reading in judge.read(images):
            on_background += reading.background == background
            still_subject += reading.subject_key == key
            total += 1

    prior = generate(pipe, subject.class_prompt, count, steps, guidance, seed=1000)
    prior_readings = judge.read(prior)
    return Scores(
        subject_similarity=own_similarity,
        subject_accuracy=own_accuracy,
        prompt_fidelity=on_background / max(total, 1),
        recontext_subject=still_subject / max(total, 1),
        pres=sum(r.subject_key == key for r in prior_readings) / count,
        div=scores.diversity(judge.embed(prior)),
        class_accuracy=sum(r.shape == subject.class_noun for r in prior_readings) / count,
    )


def real_similarity(judge: Judge, subject: Subject) -> float:
    """The real images against each other (off-diagonal): the ceiling subject similarity can reach."""
    emb = judge.embed(subject.images)
    n = emb.shape[0]
    return float(((emb @ emb.T).sum() - n) / (n * (n - 1)))


class JudgeEmbedders:
    """The judge in DINO's and CLIP's place for trainer/scores/measure.py: its embeddings for subject fidelity and
    memorisation, its background reading for prompt fidelity (the share of samples on the asked background),
    its reading of shape and colours for whether a class sample is the subject."""

    label = "toy judge"

    def __init__(self) -> None:
        self.judge = Judge()

    def subject(self, images) -> torch.Tensor:
        return self.judge.embed(list(images))

    def clip_image(self, images) -> None:
        return None

    def prompt_match(self, images, text: str) -> torch.Tensor:
        return torch.tensor([float(r.background == text) for r in self.judge.read(list(images))])

    def recontext(self, identifier: str, noun: str, photos) -> list[tuple[str, str]]:
        subject = Subject(list(photos), identifier, noun)
        return [(f"{subject.instance_prompt} on a {background} background", background)
                for background in recontext_backgrounds(self.judge, subject)[:3]]

    def looks_like_subject(self, images, photos) -> list[bool]:
        key = _subject_key(self.judge, list(photos))
        return [r.subject_key == key for r in self.judge.read(list(images))]


# Runs of the toy model are scored by the judge (trainer/scores/measure.py `load_embedders`).
scores.register_embedders(TOY_MODEL_DIR, JudgeEmbedders)
