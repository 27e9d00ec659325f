"""Will a training fit this GPU? The engine's memory model (trainer/memory/estimate.py) on the Train form's
settings: the line the form shows before Start, the best settings that fit a GPU (`pick`), and the form
values that follow from them: a machine's defaults (`safe_defaults`) and those a newly picked base model
brings (`base_model_values`), beside the model's own presets (space.presets).

A base model's config files are read from its folder or the Hub cache only: the page never waits
on the network. A Hub id not on this disk is sized with its family's known architecture (SD 1.5,
SDXL base), and the line says so.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from space import texts
from space.hardware import Hardware
from space.presets import (
    FAMILY_PRESETS,
    KNOWN_MODELS,
    SD,
    TOY_CLASS_BATCH,
    TOY_MODEL,
    first_model,
    lora_rank_for,
    model_family,
    model_kind,
    model_resolution,
    toy_first,
)
from trainer.config import TrainConfig, UserError
from trainer.memory.advice import all_changes, fitting_changes
from trainer.memory.estimate import GiB, MemoryEstimate, estimate, lower_bound, needed
from trainer.memory.shapes import KNOWN_LABELS, ModelShapes, read_shapes
from trainer.toyworld import TOY_RESOLUTION

# What a CPU (or Apple GPU) trains: the toy model, LoRA in fp32; no 8-bit Adam (bitsandbytes' CPU
# kernels are slow) and no checkpointing (the toy model's activations are tiny).
CPU_SETTINGS: dict[str, Any] = {
    "method": "lora",
    "quantize_base": "none",
    "mixed_precision": "no",
    "use_8bit_adam": False,
    "gradient_checkpointing": False,
    "cache_latents": True,
    "train_batch_size": 1,
}
# Quality first: the whole UNet and the text encoder learn the subject best, LoRA alone least.
TIERS: tuple[tuple[str, bool], ...] = (("full", True), ("full", False), ("lora", True), ("lora", False))
# The preset picker sizes a DreamBooth run as the form starts one, with prior preservation on (its
# class images generated) and a validation prompt.
# The app's runs: prior preservation, validation samples, and scores (on by default: their models stay loaded).
PICKER_PRIOR = {"with_prior_preservation": True, "class_prompt": "a photo of a dog", "validation_prompts": ("x",),
                "score_checkpoints": True}


@functools.lru_cache(maxsize=32)
def model_shapes(base_model: str, family: str) -> ModelShapes | None:
    """The base model's part configs from this disk, or its family's known ones; None when neither."""
    try:
        return read_shapes(base_model, local_only=True, family=family)
    except (UserError, OSError, ValueError):
        return None


def form_config(values: Mapping[str, Any]) -> TrainConfig | None:
    """The memory settings of the Train form's values as a (not validated) TrainConfig; None while a
    number box is being edited (the engine says what is wrong at Start)."""
    try:
        resolution, batch = int(values["resolution"]), int(values.get("train_batch_size") or 1)
        rank = int(values.get("lora_rank") or TrainConfig.lora_rank)
        accumulation = int(values.get("gradient_accumulation_steps") or 1)
        samples = int(values.get("sample_batch_size") or TrainConfig.sample_batch_size)
    except (TypeError, ValueError):
        return None
    if resolution < 8 or batch < 1 or samples < 1:
        return None
    prior = bool(values.get("with_prior_preservation"))
    return TrainConfig(
        pretrained_model=str(values.get("base_model") or ""),
        method=str(values.get("method") or "lora"),
        resolution=resolution,
        train_batch_size=batch,
        lora_rank=rank,
        gradient_accumulation_steps=accumulation,
        use_8bit_adam=bool(values.get("use_8bit_adam")),
        gradient_checkpointing=bool(values.get("gradient_checkpointing")),
        mixed_precision=str(values.get("mixed_precision") or "no"),
        train_text_encoder=bool(values.get("train_text_encoder")),
        cache_latents=values.get("cache_latents") is not False,
        with_prior_preservation=prior,
        preservation=str(values.get("preservation") or TrainConfig.preservation),
        class_prompt="a photo of a dog" if prior else "",
        sample_batch_size=samples,
        validation_prompts=("x",),
        score_checkpoints=bool(values.get("score_checkpoints")),
    )


def memory_note(hardware: Hardware, config: TrainConfig) -> str | None:
    """ "Fits / does not fit your GPU (x of y GB)", with what to change when it does not; None off
    CUDA, for the toy model (it fits anywhere) and for a base model of unknown family."""
    base_model = config.pretrained_model.strip()
    if hardware.device != "cuda" or not hardware.memory_gb or base_model == TOY_MODEL:
        return None
    family = model_family(base_model)
    shapes = model_shapes(base_model, family) if family else None
    if shapes is None:
        return None
    memory = estimate(config, "cuda", shapes=shapes)
    capacity = round(hardware.memory_gb * GiB)
    assumed = texts.memory_assumed(KNOWN_LABELS[family] if shapes.fallback else None)
    if needed(memory) <= capacity:
        return texts.MEMORY_FITS.format(need=needed(memory) / GiB, have=hardware.memory_gb) + assumed
    return (
        texts.MEMORY_DOES_NOT_FIT.format(
            need=needed(memory) / GiB, have=hardware.memory_gb, advice=_advice(config, capacity, shapes)
        )
        + assumed
    )


def _advice(config: TrainConfig, capacity: int, shapes: ModelShapes) -> str:
    """The cheapest single change that fits, else every saving together, else: a bigger GPU."""
    fitting = [f for f in fitting_changes(config, "cuda", capacity, shapes) if f.change.field in texts.MEMORY_CHANGES]
    if fitting:
        first = fitting[0]
        value = getattr(first.change.config, first.change.field)
        return texts.memory_change(first.change.field, value, first.need / GiB)
    need = needed(estimate(all_changes(config, "cuda"), "cuda", shapes=shapes))
    return texts.MEMORY_TOGETHER.format(need=need / GiB) if need <= capacity else texts.MEMORY_TOO_BIG


def form_memory_note(hardware: Hardware, values: Mapping[str, Any]) -> str | None:
    """memory_note for the Train form's values (keys as in space.form.FORM)."""
    config = form_config(values)
    return memory_note(hardware, config) if config is not None else None


# --- the settings that fit best ------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPick:
    settings: dict[str, Any]  # form values: method, train_text_encoder, mixed_precision, 8-bit Adam, ...
    why: str  # what was picked and why, for the form; empty off CUDA


def candidates(native: int, precision: str) -> Iterator[dict[str, Any]]:
    """Settings from the best quality down: resolution (native, 3/4, 1/2), then method and text
    encoder (TIERS), then fp32 Adam before 8-bit, no checkpointing before checkpointing, batch 2
    before 1, and last (it costs only time) class images 4 at a time before one at a time."""
    resolutions = dict.fromkeys([native, native * 3 // 4 // 64 * 64, native // 2])
    for resolution, (method, text_encoder) in itertools.product(resolutions, TIERS):
        for eight_bit, checkpointing, batch, samples in itertools.product((False, True), (False, True), (2, 1), (4, 1)):
            yield {
                "method": method,
                "train_text_encoder": text_encoder,
                "mixed_precision": precision,
                "use_8bit_adam": eight_bit,
                "gradient_checkpointing": checkpointing,
                "cache_latents": True,
                "train_batch_size": batch,
                "sample_batch_size": samples,
                "resolution": resolution,
                "quantize_base": "none",
            }


# SD 3 and FLUX, which the memory model does not size yet: LoRA settings by GPU memory, from the peaks
# their trainers publish, best first: (least GB, model ids or None for any of the family, settings, why).
# FLUX.1-dev: diffusers' QLoRA write-up measures 9 GB at 512x768 (NF4, rank 4, 8-bit AdamW, checkpointing,
# cached latents and text embeddings) against 26 GB in bf16; SimpleTuner 9.1 GB with NF4 at 512 px;
# kohya's sd-scripts 12 GB at 1024 px with fp8 and block swapping. SD 3.5 Medium's 2.5 B transformer is
# 5 GB in bf16; Large's 8 B is 16 GB in bf16 and about 4.5 GB in NF4.
_LORA = {"method": "lora", "train_text_encoder": False, "use_8bit_adam": True, "gradient_checkpointing": True,
         "cache_latents": True, "train_batch_size": 1, "sample_batch_size": 1}
_LARGE = ("stabilityai/stable-diffusion-3.5-large",)
TRANSFORMER_FITS: dict[str, tuple[tuple[int, tuple[str, ...] | None, dict[str, Any], str], ...]] = {
    "flux": (
        (32, None, {"quantize_base": "none", "resolution": 1024}, "a bf16 base needs about 26 GB (diffusers)"),
        (16, None, {"quantize_base": "nf4", "resolution": 1024}, "an NF4 base at 1024 px: about 14 GB"),
        (12, None, {"quantize_base": "nf4", "resolution": 512}, "an NF4 base at 512 px: about 9 GB (diffusers' "
                                                                 "QLoRA write-up)"),
    ),
    "sd3": (
        (40, _LARGE, {"quantize_base": "none", "resolution": 1024}, "SD 3.5 Large in bf16 needs about 30 GB"),
        (24, _LARGE, {"quantize_base": "nf4", "resolution": 1024}, "SD 3.5 Large in NF4 at 1024 px"),
        (16, _LARGE, {"quantize_base": "nf4", "resolution": 512}, "SD 3.5 Large in NF4 at 512 px"),
        (16, None, {"quantize_base": "none", "resolution": 1024}, "SD 3.5 Medium in bf16 at 1024 px"),
        (12, None, {"quantize_base": "none", "resolution": 512}, "SD 3.5 Medium in bf16 at 512 px"),
        (8, None, {"quantize_base": "nf4", "resolution": 512}, "SD 3.5 Medium in NF4 at 512 px"),
    ),
}


def transformer_pick(hardware: Hardware, family: str, base_model: str) -> MemoryPick:
    """The best LoRA settings of TRANSFORMER_FITS for this GPU, and the sentence that says why."""
    precision = "bf16" if hardware.bf16 else "fp16"
    rows = [row for row in TRANSFORMER_FITS[family] if row[1] is None or base_model in row[1]]
    if family == "sd3" and base_model in _LARGE:
        rows = [row for row in rows if row[1] is not None]
    for least, _, settings, why in rows:
        if hardware.memory_gb >= least:
            picked = {**_LORA, "mixed_precision": precision, **settings}
            return MemoryPick(picked, texts.MEMORY_PUBLISHED.format(what=why, have=hardware.memory_gb))
    least, _, settings, why = rows[-1]
    return MemoryPick({**_LORA, "mixed_precision": precision, **settings},
                      texts.MEMORY_PUBLISHED_SHORT.format(what=why, least=least, have=hardware.memory_gb))


@functools.lru_cache(maxsize=32)
def pick(hardware: Hardware, family: str, base_model: str, lora_rank: int) -> MemoryPick:
    """The best-quality settings (`candidates`) that the memory model says fit this GPU."""
    if hardware.device == "cuda" and hardware.memory_gb and family in TRANSFORMER_FITS:
        return transformer_pick(hardware, family, base_model)
    shapes = model_shapes(base_model, family)
    if hardware.device != "cuda" or not hardware.memory_gb or shapes is None:
        return MemoryPick(dict(CPU_SETTINGS), "")
    precision = "bf16" if hardware.bf16 else "fp16"
    native = model_resolution(base_model) or shapes.native_resolution
    capacity, previous = round(hardware.memory_gb * GiB), None
    for settings in candidates(native, precision):
        config = TrainConfig(pretrained_model=base_model, lora_rank=lora_rank, **PICKER_PRIOR, **settings)
        # Where the weights and optimizer alone do not fit, there is no need to weigh the activations.
        if lower_bound(config, "cuda", shapes) <= capacity:
            memory = estimate(config, "cuda", shapes=shapes)
            if needed(memory) <= capacity:
                better = (previous[0], _gb(estimate(previous[1], "cuda", shapes=shapes))) if previous else None
                return MemoryPick(settings, texts.memory_picked(settings, _gb(memory), hardware.memory_gb, better))
        previous = (settings, config)
    smallest = _gb(estimate(config, "cuda", shapes=shapes))
    return MemoryPick(settings, texts.memory_nothing_fits(settings, smallest, hardware.memory_gb))


def _gb(memory: MemoryEstimate) -> float:
    return needed(memory) / GiB


# --- the form values that fit this machine --------------------------------------------------------
def memory_pick(hw: Hardware, family: str = SD, base_model: str | None = None) -> MemoryPick:
    """The best settings that fit this machine for `base_model` (default: the family's first known
    model), with the sentence that says what was picked and why (`pick`)."""
    model = base_model or first_model(family)
    rank = lora_rank_for(model) or FAMILY_PRESETS[family].lora_rank
    return pick(hw, family, model, rank)


def memory_settings(hw: Hardware, family: str = SD, base_model: str | None = None) -> dict[str, Any]:
    """Method, text encoder, precision, memory savings, resolution and batch that fit this machine best
    (no CUDA: LoRA in fp32, for the toy model)."""
    return dict(memory_pick(hw, family, base_model).settings)


def safe_defaults(hw: Hardware, offline: bool = False, family: str = SD) -> dict[str, Any]:
    """Form values that fit this machine, with the first known base model of `family` (the toy
    model where it is the only one that will work) and that model's size and LoRA rank."""
    defaults: dict[str, Any] = {}
    if hw.device == "cuda":
        base_model = first_model(family)
        defaults.update(base_model=base_model, resolution=KNOWN_MODELS[base_model].resolution)
    defaults.update(memory_settings(hw, family))  # on a GPU it may lower the resolution to fit
    if toy_first(hw, offline):
        defaults.update(base_model=TOY_MODEL, resolution=TOY_RESOLUTION, sample_batch_size=TOY_CLASS_BATCH)
    if "base_model" in defaults:
        defaults["lora_rank"] = lora_rank_for(defaults["base_model"])
    return defaults


def base_model_values(hw: Hardware, base_model: str, previous: str | None) -> tuple[str | None, dict[str, Any]]:
    """(model_kind, form values) when the visitor picks `base_model` after a model of kind
    `previous`. The size always follows the model (SD 2.1 wants 768); a new family also brings
    its LoRA rank, learning rate and the best settings that fit this machine (memory_settings:
    method, text encoder, 8-bit Adam, checkpointing, resolution, batch, class images per batch). The
    toy model brings only its size and rank: the example picks it and sets the rest itself. Unknown:
    nothing changes."""
    kind = model_kind(base_model)
    if kind is None:
        return None, {}
    values: dict[str, Any] = {"resolution": model_resolution(base_model)}
    if kind == previous:
        return kind, values
    values["lora_rank"] = lora_rank_for(base_model)
    if kind == "toy":
        values["sample_batch_size"] = TOY_CLASS_BATCH
    else:
        values.update(memory_settings(hw, kind, base_model))
        values["learning_rate"] = FAMILY_PRESETS[kind].learning_rate[values["method"]]
    return kind, values
