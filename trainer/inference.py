"""The Generate service: resolve a model (local run or Hub repo), keep it loaded, make images.

A model is named by one string: a local run folder, a local pipeline folder or a Hub repo id.
A full pipeline loads as is; a LoRA loads its base model (named by its card's `base_model`, else
by its config.json) plus the LoRA file. Only safetensors weights are ever loaded.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL.Image import Image

from trainer import run_folder
from trainer.config import MAX_GUIDANCE, UserError
from trainer.publish.hub import download_model
from trainer.run_folder import LORA_WEIGHTS, lora_base_model, run_kind

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "DPM++ 2M": DPMSolverMultistepScheduler,
    "Euler ancestral": EulerAncestralDiscreteScheduler,
    "Euler": EulerDiscreteScheduler,
    "DDIM": DDIMScheduler,
    "PNDM": PNDMScheduler,
    "UniPC": UniPCMultistepScheduler,
}
ADAPTER_NAME = "dreambooth"
MAX_SIZE = 2048
MAX_IMAGES = 8
MAX_STEPS = 200
MAX_LORA_SCALE = 2.0


class TimeLimit(UserError):
    """A generation ran past its deadline and was stopped between two steps."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    steps: int = 25
    scheduler: str = "DPM++ 2M"
    seed: int = 0
    width: int = 512
    height: int = 512
    num_images: int = 1
    lora_scale: float = 1.0

    def validate(self) -> GenerateRequest:
        """Raise ValueError naming the first bad field; return self so calls chain."""
        for name in ("prompt", "negative_prompt", "scheduler"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"`{name}` must be text, got {value!r}")
            if "\x00" in value:
                raise ValueError(f"`{name}` must not contain a NUL character")
        for name in ("steps", "seed", "width", "height", "num_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"`{name}` must be a whole number, got {value!r}")
        for name in ("guidance_scale", "lora_scale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        if not self.prompt.strip():
            raise ValueError("`prompt` must not be empty")
        if self.width % 8 or self.height % 8:
            raise ValueError(
                f"`width` and `height` must be multiples of 8, got {self.width} and {self.height}"
            )
        if not (8 <= self.width <= MAX_SIZE and 8 <= self.height <= MAX_SIZE):
            raise ValueError(
                f"`width` and `height` must be between 8 and {MAX_SIZE}, got {self.width} and {self.height}"
            )
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"`steps` must be between 1 and {MAX_STEPS}, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}")
        if self.guidance_scale > MAX_GUIDANCE:
            raise ValueError(f"`guidance_scale` must be at most {MAX_GUIDANCE:g} (7.5 is usual), got {self.guidance_scale}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"`seed` must be between 0 and 2**63 - 1, got {self.seed}")
        if not 1 <= self.num_images <= MAX_IMAGES:
            raise ValueError(f"`num_images` must be between 1 and {MAX_IMAGES}, got {self.num_images}")
        if not 0.0 <= self.lora_scale <= MAX_LORA_SCALE:
            raise ValueError(f"`lora_scale` must be between 0 and {MAX_LORA_SCALE:g}, got {self.lora_scale}")
        return self

    def check_prompt_length(self, tokenizers: Sequence[Any]) -> None:
        """Raise ValueError for a prompt the text encoder would cut short (the pipeline only logs it)."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            for tokenizer in tokenizers:
                n = len(tokenizer(text).input_ids)  # with the start and end tokens
                if n > tokenizer.model_max_length:
                    raise ValueError(
                        f"`{name}` is {n} tokens long; the text encoder reads at most {tokenizer.model_max_length} "
                        "(start and end included): shorten it"
                    )


@dataclass(frozen=True)
class ModelSource:
    """What to load: a full pipeline folder, or a base pipeline folder plus a LoRA folder."""

    name: str  # as the user named it: a path or a repo id
    kind: Literal["full", "lora"]
    pipeline_dir: Path  # the full pipeline, or the LoRA's base pipeline
    lora_dir: Path | None = None


def resolve_model(source: str, *, token: str | None = None, endpoint: str | None = None) -> ModelSource:
    """Find the folders behind `source` (a local folder or a Hub repo id), downloading if needed."""
    source = source.strip()
    if not source:
        raise ValueError("No model given: choose a local run or enter a Hub repo id.")
    local = Path(source).expanduser()
    if local.is_dir():
        return _from_folder(source, local, token=token, endpoint=endpoint)
    if local.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise ValueError(f"{source!r} is neither a local model folder nor a Hub repo id (user/name).")
    return _from_folder(
        source, download_model(source, token, endpoint=endpoint), token=token, endpoint=endpoint
    )


def _from_folder(name: str, folder: Path, *, token: str | None, endpoint: str | None) -> ModelSource:
    kind = run_kind(folder)
    if kind == "full":
        return ModelSource(name, "full", folder)
    if kind is None:
        raise ValueError(
            f"{name} has no safetensors weights to load: expected model_index.json (a full pipeline) "
            f"or {LORA_WEIGHTS} (a LoRA)."
        )
    base, revision = lora_base_model(folder)
    if base is None:
        raise ValueError(f"{name} is a LoRA but names no base model (no base_model in its card or config).")
    base_dir = Path(base).expanduser()
    if not base_dir.is_dir():
        if base_dir.is_absolute() or base.startswith((".", "~")) or base.count("/") != 1:
            raise ValueError(
                f"The base model of {name} is the folder {base}, which is not on this machine: "
                "publish the base model too, or train from a Hub model."
            )
        base_dir = download_model(base, token, revision=revision, endpoint=endpoint)
    if run_kind(base_dir) != "full":
        raise ValueError(
            f"The base model of {name}, {base}, is not a diffusers pipeline (no model_index.json)."
        )
    _check_lora_fits(name, folder, base, base_dir)
    return ModelSource(name, "lora", base_dir, lora_dir=folder)


# The width of the text conditioning a UNet's cross-attention takes tells the generations apart.
_CONDITIONING_WIDTHS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}


def _check_lora_fits(name: str, lora_dir: Path, base: str, base_dir: Path) -> None:
    """A LoRA made for another model generation than its base is refused, naming both, before loading."""
    from safetensors import safe_open

    from trainer.families import detect_family

    with safe_open(lora_dir / LORA_WEIGHTS, framework="pt") as weights:
        parts = {key.split(".", 1)[0] for key in weights.keys()}  # noqa: SIM118 (safe_open is no dict)
    denoiser = detect_family(str(base_dir)).denoiser_name
    made_for = {"unet", "transformer"} & parts
    if made_for and denoiser not in made_for:
        lora_kind = "a UNet (Stable Diffusion 1.x, 2.x or XL)" if "unet" in made_for else "a transformer (SD 3 or FLUX)"
        raise ValueError(f"{name} is a LoRA for {lora_kind}, but its base model {base} is "
                         f"{detect_family(str(base_dir)).label}: a LoRA only loads onto the model it was trained on.")
    unet_config = base_dir / "unet" / "config.json"
    if not unet_config.is_file():
        return
    base_width = json.loads(unet_config.read_text(encoding="utf-8")).get("cross_attention_dim")
    with safe_open(lora_dir / LORA_WEIGHTS, framework="pt") as weights:
        names = weights.keys()
        # The down (A) matrix of a cross-attention key projection: [rank, conditioning width].
        keys = [k for k in names if k.startswith("unet.") and "attn2.to_k" in k and ("lora_A" in k or "lora.down" in k)]
        lora_width = weights.get_slice(keys[0]).get_shape()[1] if keys else None
    if lora_width is None or not isinstance(base_width, int) or lora_width == base_width:
        return

    def generation(width: int) -> str:
        return _CONDITIONING_WIDTHS.get(width, f"a model with {width}-wide text conditioning")

    raise ValueError(
        f"{name} is a LoRA for {generation(lora_width)}, but its base model {base} is {generation(base_width)}: "
        "a LoRA only loads onto the model generation it was trained on."
    )


def is_flow_pipeline(pipe: Any) -> bool:
    """An SD 3 or FLUX pipeline: a transformer denoiser sampled by a flow-matching scheduler."""
    return "FlowMatch" in type(pipe.scheduler).__name__


def _is_t5(tokenizer: Any) -> bool:
    return "T5" in type(tokenizer).__name__


def _stop_after(deadline: float) -> Any:
    """A pipeline's callback_on_step_end that raises TimeLimit once time.monotonic() passes `deadline`."""

    def check(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if time.monotonic() > deadline:
            raise TimeLimit(f"Generation stopped after step {step + 1}: it ran past its time limit.")
        return tensors

    return check


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load_pipeline(source: ModelSource, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    """Load from local folders only, safetensors only, no remote code, no safety checker."""
    pipe = run_folder.load_pipeline(source.pipeline_dir, dtype, lora_dir=source.lora_dir, adapter_name=ADAPTER_NAME)
    return pipe.to(device)


def weights_stamp(source: str) -> tuple[int, ...]:
    """When a local folder's weights were last written: a run whose weights were replaced since it was
    loaded (a checkpoint exported as its result, trainer/export.py) is loaded again. () for a Hub id."""
    folder = Path(source.strip())
    if not folder.is_dir():
        return ()
    return tuple(path.stat().st_mtime_ns for path in (folder / run_folder.LORA_WEIGHTS, folder / run_folder.PIPELINE_INDEX)
                 if path.is_file())


class PipelineCache:
    """Keeps the last pipeline loaded: switching models costs a load, repeated prompts do not."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str, torch.dtype, tuple[int, ...]] | None = None
        self._pipe: DiffusionPipeline | None = None

    def get(
        self,
        source: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        *,
        token: str | None = None,
        endpoint: str | None = None,
    ) -> DiffusionPipeline:
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        key = (source.strip(), str(device), dtype, weights_stamp(source))
        with self._lock:
            if self._key != key or self._pipe is None:
                self._pipe = None  # free the old one before loading the new one
                self._key = None
                self._pipe = load_pipeline(
                    resolve_model(source, token=token, endpoint=endpoint), device, dtype
                )
                self._key = key
            return self._pipe


def generate(pipe: DiffusionPipeline, request: GenerateRequest, deadline: float | None = None) -> list[Image]:
    """Images for `request`; image i is what seed `seed + i` gives alone, on any device. Past `deadline`
    (a time.monotonic() value) it stops at the next step with TimeLimit."""
    request.validate()
    flow = is_flow_pipeline(pipe)
    tokenizers = [getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]
    # CLIP reads 77 tokens, and SD 3 and FLUX read the rest of a longer prompt through T5: check what reads it.
    request.check_prompt_length([t for t in tokenizers if t is not None and (not flow or _is_t5(t))])
    # 1. a scheduler for this request, without touching the cached pipeline (SD 3 and FLUX: their own flow sampler)
    chosen = type(pipe.scheduler) if flow else SCHEDULERS[request.scheduler]
    scheduler = chosen.from_config(pipe.scheduler.config)
    options = inspect.signature(type(pipe).__init__).parameters
    extra_config = {name: False for name in ("requires_safety_checker", "add_watermarker") if name in options}
    run = type(pipe)(**{**pipe.components, "scheduler": scheduler}, **extra_config)
    run.set_progress_bar_config(disable=True)
    # 2. one CPU generator per image: the same latents whatever the device
    generators = [
        torch.Generator(device="cpu").manual_seed(request.seed + i) for i in range(request.num_images)
    ]
    # 3. the LoRA strength, when a LoRA is loaded
    has_lora = any(ADAPTER_NAME in names for names in pipe.get_list_adapters().values())
    scale = "joint_attention_kwargs" if flow else "cross_attention_kwargs"  # the transformers' name for it
    extra: dict[str, Any] = {scale: {"scale": request.lora_scale}} if has_lora else {}
    if deadline is not None:
        extra["callback_on_step_end"] = _stop_after(deadline)
    with torch.inference_mode():
        result = run(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            num_images_per_prompt=request.num_images,
            generator=generators,
            **extra,
        )
    return list(result.images)
