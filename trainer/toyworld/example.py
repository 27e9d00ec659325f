"""The ready example subject: a star split into a yellow and a purple half.

The toy base model was pretrained on solid shapes only, so no prompt makes it draw this star:
it is a subject in the DreamBooth sense, something only the instance images can teach. The
split is coarse on purpose: each half spans several of the 8x8 latent pixels, and the VAE saw
split shapes in pretraining, so the pattern survives encoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.toyworld.world import Scene, render

EXAMPLE_IDENTIFIER = "sks"
EXAMPLE_CLASS_NOUN = "star"
EXAMPLE_INSTANCE_PROMPT = f"a photo of {EXAMPLE_IDENTIFIER} {EXAMPLE_CLASS_NOUN}"
EXAMPLE_CLASS_PROMPT = f"a photo of a {EXAMPLE_CLASS_NOUN}"
# What to try after training: the subject alone, in new contexts, and the class (prior) prompt.
EXAMPLE_PROMPTS: tuple[str, ...] = (
    EXAMPLE_INSTANCE_PROMPT,
    f"{EXAMPLE_INSTANCE_PROMPT} on a blue background",
    f"{EXAMPLE_INSTANCE_PROMPT} on a black background",
    f"{EXAMPLE_INSTANCE_PROMPT} on a green background",
    EXAMPLE_CLASS_PROMPT,
)
# One subject, seen five times: different sizes and places, on white, black or gray. The backgrounds
# vary as DreamBooth guides ask of real photos: on one background only, the subject drags it along
# into every new prompt (docs/toyworld.md measures both).
EXAMPLE_SCENES: tuple[Scene, ...] = (
    Scene("star", "yellow", "white", "purple", scale=0.40, dx=0.00, dy=0.02),
    Scene("star", "yellow", "black", "purple", scale=0.34, dx=-0.08, dy=0.06),
    Scene("star", "yellow", "gray", "purple", scale=0.38, dx=0.06, dy=-0.05),
    Scene("star", "yellow", "white", "purple", scale=0.30, dx=0.10, dy=0.10),
    Scene("star", "yellow", "black", "purple", scale=0.36, dx=-0.05, dy=-0.08),
)
EXAMPLE_IMAGE_SIZE = 64  # the engine refuses images under 64 px; it resizes them to 32 for training

# A DreamBooth run of the example that visibly works in about a minute on a CPU (docs/toyworld.md):
# LoRA with prior preservation, the settings that met every target of the benchmark. The toy model's
# weights are small and young, so it wants far larger learning rates than SD's 5e-6 / 1e-4. Its text
# encoder never learned to read unknown words like "sks" (it ignores them), so the text encoder
# trains too (LoRA on its attention), for the first half of the steps: without it the prior loss on
# "a photo of a star" and the instance loss on "a photo of sks star" pull the same way. The prior
# loss weighs 0.5, not diffusers' 1.0: at 1.0 it held the subject back on some training seeds.
EXAMPLE_SETTINGS: dict[str, Any] = {
    "identifier": EXAMPLE_IDENTIFIER,
    "instance_prompt": EXAMPLE_INSTANCE_PROMPT,
    "class_prompt": EXAMPLE_CLASS_PROMPT,
    "with_prior_preservation": True,
    "prior_loss_weight": 0.5,
    "resolution": 32,
    "method": "lora",
    "train_text_encoder": True,
    "text_encoder_steps_fraction": 0.5,
    "learning_rate": 1e-3,
    "lora_rank": 8,
    "max_train_steps": 1200,
    "train_batch_size": 2,
    "num_class_images": 50,
    "class_inference_steps": 20,
    "sample_batch_size": 25,
    "use_8bit_adam": False,
    "gradient_checkpointing": False,
    "validation_inference_steps": 20,
    "validation_guidance_scale": 5.0,
    "checkpointing_steps": 1000,
    "report_to": "none",
}
# Full fine-tuning moves every weight, so it takes a smaller step than LoRA's few small matrices.
FULL_LEARNING_RATE = 1e-4


def example_caption(scene: Scene) -> str:
    """What a careful user writes beside each photo: the subject, and what is not the subject."""
    return f"{EXAMPLE_INSTANCE_PROMPT} on a {scene.background} background"


def example_subject(out_dir: Path, size: int = EXAMPLE_IMAGE_SIZE, captions: bool = False) -> Path:
    """Write the example's instance images as PNGs into `out_dir` (created) and return it; with
    `captions`, a caption file beside each naming its background (measured in docs/toyworld.md)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(EXAMPLE_SCENES):
        render(scene, size).save(out_dir / f"sks-star-{i}.png")
        if captions:
            (out_dir / f"sks-star-{i}.txt").write_text(example_caption(scene) + "\n", encoding="utf-8")
    return out_dir


def example_config(base_model: Path | str, instance_dir: Path | str, output_dir: Path | str,
                   **changes: Any) -> TrainConfig:
    """The example's TrainConfig; `changes` override any field (e.g. method="full")."""
    settings = dict(EXAMPLE_SETTINGS)
    if changes.get("method") == "full" and "learning_rate" not in changes:
        settings["learning_rate"] = FULL_LEARNING_RATE
    settings.update(changes)
    return TrainConfig(pretrained_model=str(base_model), instance_data=(str(instance_dir),),
                       output_dir=str(output_dir), **settings)
