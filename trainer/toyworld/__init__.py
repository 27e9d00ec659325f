"""The toy world: a synthetic world of coloured shapes, a tiny Stable Diffusion pretrained on it
(shipped in trainer/assets/toy-sd), a judge that reads its pictures, and an example subject.

It lets DreamBooth run and be measured on any CPU, offline. Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path

from trainer.toyworld.example import (
    EXAMPLE_CLASS_NOUN,
    EXAMPLE_CLASS_PROMPT,
    EXAMPLE_IDENTIFIER,
    EXAMPLE_INSTANCE_PROMPT,
    EXAMPLE_PROMPTS,
    EXAMPLE_SETTINGS,
    example_config,
    example_subject,
)

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TOY_MODEL_DIR = ASSETS_DIR / "toy-sd"
# The real CLIP tokenizer of SD 1.5 (written by tools/build_clip_tokenizer.py): the toy model and
# the tests' tiny model tokenize prompts to the ids SD 1.5 sees.
CLIP_TOKENIZER_DIR = ASSETS_DIR / "clip-tokenizer"
T5_TOKENIZER_DIR = ASSETS_DIR / "t5-tokenizer"
TOY_MODEL_LABEL = "Toy model (shapes world, runs on CPU)"
TOY_RESOLUTION = 32

__all__ = [
    "CLIP_TOKENIZER_DIR",
    "EXAMPLE_CLASS_NOUN",
    "EXAMPLE_CLASS_PROMPT",
    "EXAMPLE_IDENTIFIER",
    "EXAMPLE_INSTANCE_PROMPT",
    "EXAMPLE_PROMPTS",
    "EXAMPLE_SETTINGS",
    "T5_TOKENIZER_DIR",
    "TOY_MODEL_DIR",
    "TOY_MODEL_LABEL",
    "TOY_RESOLUTION",
    "example_config",
    "example_subject",
]
