"""Tiny, randomly initialised scoring models with the real classes: a DINOv2 and a CLIP, each saved with
its image processor (and CLIP with the real CLIP tokenizer) so `from_pretrained` loads them as it loads
facebook/dinov2-small and openai/clip-vit-base-patch32. Their embeddings mean nothing; they check the
plumbing and the properties that hold for any embedder (determinism, a copy scores highest, zero drift
for the base model)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, Dinov2Config, Dinov2Model
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from trainer.toyworld import CLIP_TOKENIZER_DIR

SIZE = 32  # the processors resize and crop every image to this; the tiny SD draws 32 px images
LAYER = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}


def build_tiny_scorers(root: Path) -> tuple[Path, Path]:
    """(DINOv2 folder, CLIP folder) under `root`."""
    torch.manual_seed(0)
    dino_dir, clip_dir = root / "dinov2", root / "clip"
    Dinov2Model(Dinov2Config(**LAYER, image_size=SIZE, patch_size=8)).save_pretrained(dino_dir)
    BitImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(dino_dir)
    config = CLIPConfig(text_config={**LAYER, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**LAYER, "image_size": SIZE, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(clip_dir)
    CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR).save_pretrained(clip_dir)
    return dino_dir, clip_dir
