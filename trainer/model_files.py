"""The names diffusers gives a model's files and folders: a pipeline's index, its text encoders'
folders, a LoRA file. The run folder (trainer/run_folder.py), the model families, checkpoints and
memory estimates all use these; this module imports nothing, so any of them can import it."""

from __future__ import annotations

PIPELINE_INDEX = "model_index.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' save/load_lora_weights use
# The text encoders' folders (and the keys of their LoRA layers, checkpoint files, memory shapes), in
# the order of Components.text_encoders: Stable Diffusion 1.x/2.x has the first, SDXL both.
TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3 = "text_encoder", "text_encoder_2", "text_encoder_3"
TEXT_ENCODERS: tuple[str, ...] = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)


def text_encoder_names(count: int) -> list[str]:
    """The names of a model's first `count` text encoders: text_encoder, text_encoder_2, text_encoder_3."""
    if not 0 <= count <= len(TEXT_ENCODERS):
        raise ValueError(f"a model has at most {len(TEXT_ENCODERS)} text encoders, got {count}")
    return list(TEXT_ENCODERS[:count])
