"""Will a training fit this GPU? A rough estimate per family and method, and the note the Train tab
shows when a chosen setting will not fit.

The figures are the documented recipes, split into what the weights and optimizer take and what
the activations take (which grow with the number of pixels):
- SD 1.x/2.x LoRA fits 8 GB; full fine-tuning fits 16 GB only with 8-bit Adam and gradient
  checkpointing, ~24 GB without (diffusers' train_dreambooth README).
- SDXL LoRA at 1024 px needs ~16 GB with fp16, 8-bit Adam and gradient checkpointing
  (diffusers' train_dreambooth_lora_sdxl README); full SDXL fine-tuning ~40 GB even with 8-bit Adam.
- 8-bit Adam saves the fp32 Adam states of the trained weights: ~5 GB for SD's 860M-parameter
  UNet, ~16 GB for SDXL's 2.6B; nothing worth counting for LoRA's few million.
All assume fp16 or bf16 for the frozen weights, as the hardware presets choose on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from space import texts
from space.hardware import Hardware
from space.presets import TOY_MODEL, model_family
from trainer.families import family_by_name

# Cards report GiB a little under their nominal GB (a "16 GB" card: 14.6-15.9 GiB), and the
# figures above are round: a setting fits when it needs at most this much more than reported.
SLACK = 1.1


@dataclass(frozen=True)
class MemoryRecipe:
    """GB one training takes, at its family's native size."""

    weights_gb: float  # weights, gradients, 8-bit optimizer states, CUDA context
    adam_fp32_gb: float  # added without 8-bit Adam
    activations_gb: float  # with gradient checkpointing
    activations_unchecked_gb: float  # without

    def need(self, scale: float, use_8bit_adam: bool, gradient_checkpointing: bool) -> float:
        activations = self.activations_gb if gradient_checkpointing else self.activations_unchecked_gb
        return self.weights_gb + (0.0 if use_8bit_adam else self.adam_fp32_gb) + activations * scale


RECIPES: dict[tuple[str, str], MemoryRecipe] = {
    ("sd", "lora"): MemoryRecipe(6, 0, 2, 5),
    ("sd", "full"): MemoryRecipe(14, 5, 2, 5),
    ("sdxl", "lora"): MemoryRecipe(12, 0, 4, 12),
    ("sdxl", "full"): MemoryRecipe(36, 16, 4, 12),
}


def estimate_gb(
    family_name: str, method: str, resolution: int, use_8bit_adam: bool, gradient_checkpointing: bool
) -> float | None:
    """GB a training needs, roughly; None for a family or method without a recipe."""
    recipe = RECIPES.get((family_name, method))
    if recipe is None:
        return None
    scale = (resolution / family_by_name(family_name).default_resolution) ** 2
    return recipe.need(scale, use_8bit_adam, gradient_checkpointing)


def memory_note(
    hardware: Hardware,
    family_name: str | None,
    method: str,
    resolution: int,
    use_8bit_adam: bool,
    gradient_checkpointing: bool,
) -> str | None:
    """A sentence for the form when these settings will not fit this GPU, with what would; None when
    they fit, or when there is nothing to tell (no CUDA memory figure, an unknown family)."""
    if hardware.device != "cuda" or not hardware.memory_gb or family_name is None or resolution <= 0:
        return None
    need = estimate_gb(family_name, method, resolution, use_8bit_adam, gradient_checkpointing)
    if need is None or need <= hardware.memory_gb * SLACK:
        return None
    saved = estimate_gb(family_name, method, resolution, True, True)
    lora = estimate_gb(family_name, "lora", resolution, True, True)
    if saved is not None and saved <= hardware.memory_gb * SLACK:
        off = [] if gradient_checkpointing else ["gradient checkpointing"]
        if not use_8bit_adam and estimate_gb(family_name, method, resolution, True, gradient_checkpointing) < need:
            off.append("8-bit Adam")  # only where it saves something: not for LoRA's few weights
        advice = texts.MEMORY_TURN_ON.format(savings=" and ".join(off), need=round(saved))
    elif method != "lora" and lora is not None and lora <= hardware.memory_gb * SLACK:
        advice = texts.MEMORY_USE_LORA.format(need=round(lora))
    else:
        advice = texts.MEMORY_TOO_BIG
    what = texts.memory_what(family_by_name(family_name).label, method, resolution)
    return texts.MEMORY_NOTE.format(what=what, need=round(need), have=round(hardware.memory_gb), advice=advice)


def form_memory_note(
    hardware: Hardware,
    base_model: str | None,
    method: str,
    resolution: Any,
    use_8bit_adam: bool,
    gradient_checkpointing: bool,
) -> str | None:
    """memory_note for the Train form's values, as its widgets give them; None for the toy model."""
    base_model = (base_model or "").strip()
    family = None if base_model == TOY_MODEL else model_family(base_model)
    try:
        size = int(resolution)
    except (TypeError, ValueError):  # the box is being edited: the engine will say what is wrong
        size = 0
    return memory_note(hardware, family, method, size, bool(use_8bit_adam), bool(gradient_checkpointing))
