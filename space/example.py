"""The ready example of the toy world, in the UI's terms: its photos as files the upload can hold,
the Train form as the example fills it, and the prompts to try once it is trained.

The subject, its prompts and its settings are trainer.toyworld's (example.py there): a star painted
half yellow, half purple, which the toy model cannot draw from text alone. Filling the form with
them and pressing Start trains exactly `example_config(...)`, plus a validation prompt and the scores
of SCORED_CHECKPOINTS checkpoints (the toy world's judge scores them; scoring leaves the training as it is).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from space.form import Concept, checkpoint_every, config_to_form
from space.presets import TOY_MODEL, ToyModel
from trainer.config import TrainConfig
from trainer.run_folder import try_read_config
from trainer.toyworld import (
    EXAMPLE_CLASS_NOUN,
    EXAMPLE_INSTANCE_PROMPT,
    EXAMPLE_PROMPTS,
    EXAMPLE_SETTINGS,
    example_subject,
)
from trainer.toyworld.example import EXAMPLE_SCENES
from trainer.toyworld.world import Scene

EXAMPLE_FOLDER = "example-subject"  # under the runs folder; app.py lets gradio serve this folder alone
# What the toy base model draws from text: one shape, one colour, one plain background, in the
# words of its captions.
TOY_PROMPTS: tuple[str, ...] = tuple(
    Scene(shape, color, background).caption()
    for shape, color, background in (
        ("star", "red", "white"),
        ("circle", "blue", "black"),
        ("triangle", "green", "gray"),
        ("square", "purple", "white"),
    )
)
_writing = threading.Lock()  # two visitors pressing the button at once write the same files


def example_images(folder: Path) -> list[str]:
    """The example's photos as PNG files in `folder` (written on first use, then reused)."""
    with _writing:
        if len(list(folder.glob("*.png"))) < len(EXAMPLE_SCENES):
            example_subject(folder)
    return sorted(str(p) for p in folder.glob("*.png"))


def example_form(images: Sequence[str], base_model: str = TOY_MODEL) -> dict[str, Any]:
    """The Train form (keys as in space.form.FORM) filled with the example: EXAMPLE_SETTINGS where
    they say, TrainConfig's defaults elsewhere, as example_config() does; scored, as the app's runs are."""
    config = TrainConfig(**EXAMPLE_SETTINGS)
    values = config_to_form(config)
    values.update(
        images=list(images),
        class_noun=EXAMPLE_CLASS_NOUN,
        concept=Concept.OBJECT.value,
        base_model=base_model,
        learning_rate=config.lr,
        # Sampled during training: the subject somewhere its photos never showed it.
        validation_prompt=EXAMPLE_PROMPTS[1],
        score_checkpoints=True,
        checkpointing_steps=checkpoint_every(config.max_train_steps),
        # Sampled where it is scored: the samples of the picked step are there to look at.
        validation_steps=checkpoint_every(config.max_train_steps),
    )
    return values


def suggested_prompts(source: str, toy: ToyModel) -> list[str]:
    """Prompts worth trying with a Generate tab model: the example's for a run of the example on
    the toy model, what the toy model can draw for the toy model itself, none otherwise."""
    if source == TOY_MODEL:
        return list(TOY_PROMPTS)
    run = try_read_config(Path(source))
    if run is not None and run.instance_prompt == EXAMPLE_INSTANCE_PROMPT and Path(run.pretrained_model) == toy.folder:
        return list(EXAMPLE_PROMPTS)
    return []
