"""The one place where the Train form's values become a TrainConfig, plus the concept presets."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from trainer.config import DEFAULT_LR, ConfigError, TrainConfig
from trainer.data import is_caption_file

MIN_IMAGES, MAX_IMAGES = 3, 20
# Form keys that are TrainConfig fields of the same name, and every field form_to_config sets.
CONFIG_KEYS: tuple[str, ...] = (
    "identifier",
    "instance_prompt",
    "with_prior_preservation",
    "class_prompt",
    "num_class_images",
    "method",
    "train_text_encoder",
    "text_encoder_steps_fraction",
    "max_train_steps",
    "learning_rate",
    "train_batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "use_8bit_adam",
    "gradient_checkpointing",
    "mixed_precision",
    "seed",
    "checkpointing_steps",
    "validation_steps",
)
FORM_FIELDS = frozenset({*CONFIG_KEYS, "pretrained_model", "instance_data", "output_dir", "validation_prompts"})


class Concept(StrEnum):
    OBJECT = "object"
    PERSON = "person"
    STYLE = "style"


@dataclass(frozen=True)
class Preset:
    steps_per_image: int
    text_encoder_fraction: float


# multimodalart's "Dreambooth Training" Space (see shared/REFERENCE.md): 200 steps per image;
# faces need the text encoder longest, styles barely (it would drift the whole vocabulary).
PRESETS: dict[Concept, Preset] = {
    Concept.OBJECT: Preset(200, 0.30),
    Concept.PERSON: Preset(200, 0.65),
    Concept.STYLE: Preset(200, 0.15),
}


def preset_values(concept: str, num_images: int, method: str) -> dict[str, Any]:
    """Steps, learning rate and text-encoder training a concept type implies."""
    preset = PRESETS[Concept(concept)]
    return {
        "max_train_steps": preset.steps_per_image * max(num_images, 1),
        "learning_rate": DEFAULT_LR.get(method, DEFAULT_LR["lora"]),
        "train_text_encoder": True,
        "text_encoder_steps_fraction": preset.text_encoder_fraction,
    }


def prompts_for(identifier: str, class_noun: str, concept: str) -> tuple[str, str]:
    """(instance prompt, class prompt) in the paper's "a [V] [class noun]" form."""
    ident, noun = identifier.strip(), class_noun.strip()
    if Concept(concept) is Concept.STYLE:
        noun = noun or "painting"
        return f"a {noun} in the style of {ident}", f"a {noun}"
    return (f"a photo of {ident} {noun}".rstrip(), f"a photo of {noun}" if noun else "")


def new_run_dir(runs_dir: Path, identifier: str) -> Path:
    """A fresh folder name: sortable by time, readable by subject, never an existing run."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", identifier.strip()).strip("-") or "run"
    base = Path(runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _image_paths(value: Any) -> tuple[str, ...]:
    """gr.File(file_count="multiple") gives paths; gradio_client may send FileData dicts."""
    items = value or []
    paths = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("path") or item.get("name")
        paths.append(str(getattr(item, "name", item)))
    return tuple(paths)


def photos_only(paths: Sequence[str]) -> list[str]:
    """The uploads without their caption files (dog1.txt beside dog1.jpg is that photo's prompt)."""
    return [p for p in paths if not is_caption_file(p, TrainConfig.caption_extension)]


def _number(values: Mapping[str, Any], field: str, kind: type) -> Any:
    raw = values.get(field)
    if raw is None or raw == "":
        raise ConfigError(f"`{field}` is required")
    try:
        number = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"`{field}` must be a number, got {raw!r}") from None
    if kind is int and float(raw) != number:
        raise ConfigError(f"`{field}` must be a whole number, got {raw!r}")
    return number


def _no_settings(base_model: str) -> Mapping[str, Any]:
    return {}


def form_to_config(
    values: Mapping[str, Any],
    runs_dir: Path,
    resolve_model: Callable[[str], str] = str.strip,
    model_settings: Callable[[str], Mapping[str, Any]] = _no_settings,
) -> TrainConfig:
    """Map the Train form (keys as in train_tab's FORM) to a validated TrainConfig.

    Raises ConfigError with the engine's own words; `resolve_model` turns the demo entry of
    the model list into its folder (and is only called once everything else is valid).
    `model_settings` gives the engine settings a base model wants that the form does not show
    (the toy model's LoRA rank and sampler steps); the form's own fields always win.
    """
    images = _image_paths(values.get("images"))  # photos, and any caption .txt files uploaded with them
    n_photos = len(photos_only(images))
    if not MIN_IMAGES <= n_photos <= MAX_IMAGES:
        raise ConfigError(f"`instance_data` needs {MIN_IMAGES} to {MAX_IMAGES} images, got {n_photos}")
    identifier = str(values.get("identifier") or "").strip()
    validation_prompt = str(values.get("validation_prompt") or "").strip()
    instance_prompt = str(values.get("instance_prompt") or "").strip()
    base_model = str(values.get("base_model") or "").strip()
    hidden = {k: v for k, v in model_settings(base_model).items() if k not in FORM_FIELDS}
    config = TrainConfig(
        pretrained_model=base_model,
        instance_data=images,
        identifier=identifier,
        instance_prompt=instance_prompt,
        output_dir=str(new_run_dir(runs_dir, identifier)),
        with_prior_preservation=bool(values.get("with_prior_preservation")),
        class_prompt=str(values.get("class_prompt") or "").strip(),
        num_class_images=_number(values, "num_class_images", int),
        method=str(values.get("method") or "lora"),
        train_text_encoder=bool(values.get("train_text_encoder")),
        text_encoder_steps_fraction=_number(values, "text_encoder_steps_fraction", float),
        max_train_steps=_number(values, "max_train_steps", int),
        learning_rate=_number(values, "learning_rate", float),
        train_batch_size=_number(values, "train_batch_size", int),
        gradient_accumulation_steps=_number(values, "gradient_accumulation_steps", int),
        resolution=_number(values, "resolution", int),
        use_8bit_adam=bool(values.get("use_8bit_adam")),
        gradient_checkpointing=bool(values.get("gradient_checkpointing")),
        mixed_precision=str(values.get("mixed_precision") or "no"),
        seed=_number(values, "seed", int),
        checkpointing_steps=_number(values, "checkpointing_steps", int),
        validation_prompts=(validation_prompt or instance_prompt,),
        validation_steps=_number(values, "validation_steps", int),
        **hidden,
    ).validate()
    return config.replace(pretrained_model=resolve_model(config.pretrained_model))
