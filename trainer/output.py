"""Validation samples during training, and the run folder's final weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from trainer import atomic
from trainer.config import TrainConfig
from trainer.families import Components
from trainer.run_folder import (
    KOHYA_LORA_WEIGHTS,
    LORA_WEIGHTS,
    PIPELINE_INDEX,
    WEIGHTS_STAGING,
    sample_path,
    samples_dir,
)


def pipeline_from_parts(parts: Components, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module]):
    """The family's inference pipeline over the in-memory modules (no copy), with its sampler."""
    return parts.family.pipeline(parts, denoiser, text_encoders, parts.family.sampling_scheduler(parts))


def make_samples(
    config: TrainConfig,
    parts: Components,
    denoiser: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    step: int,
    run_dir: Path,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> list[Path]:
    """One image per (prompt, index) with seed `config.seed + index`: comparable across steps."""
    samples_dir(run_dir).mkdir(parents=True, exist_ok=True)
    pipe = pipeline_from_parts(parts, denoiser, text_encoders)
    paths = []
    with evaluating([denoiser, *text_encoders]):
        for p, prompt in enumerate(config.validation_prompts):
            for i in range(config.num_validation_images):
                generator = torch.Generator(device="cpu").manual_seed(config.seed + i)
                with torch.no_grad(), autocast():
                    image = pipe(
                        prompt,
                        num_inference_steps=config.validation_inference_steps,
                        guidance_scale=config.validation_guidance_scale,
                        height=config.resolution,
                        width=config.resolution,
                        generator=generator,
                        **parts.family.sampling_kwargs(config),
                    ).images[0]
                path = sample_path(run_dir, step, p, i)
                with atomic.written(path) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(path)
    return paths


@contextlib.contextmanager
def evaluating(modules: Sequence[torch.nn.Module]):
    """The modules in eval mode for sampling, each back in the mode it was in afterwards."""
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)


def save_weights(config: TrainConfig, parts: Components, denoiser: torch.nn.Module,
                 text_encoders: Sequence[torch.nn.Module], run_dir: Path) -> Path:
    """Full: a pipeline folder plain `from_pretrained` loads. LoRA: the diffusers LoRA file (and kohya's).

    Saved into a hidden folder of the run folder, then moved into place with the file that says the run
    has weights (`run_kind`: model_index.json, the LoRA file) last: a save killed or stopped by a full
    disk leaves no weights that look complete, and one that fails removes what it wrote and raises an
    OSError naming the weights."""
    run_dir = Path(run_dir)
    staging = run_dir / WEIGHTS_STAGING
    marker = run_dir / (LORA_WEIGHTS if config.method == "lora" else PIPELINE_INDEX)
    atomic.remove(staging)  # a killed save's
    staging.mkdir()
    with atomic.cleaned_up(staging, marker if config.method == "lora" else run_dir):
        if config.method == "lora":
            weights = _save_lora(config, parts, denoiser, text_encoders, staging)
        else:
            weights = parts.family.save_full(config.pretrained_model, config.revision, parts, denoiser, text_encoders,
                                             staging, to_fp32=config.mixed_precision != "no")
    _move_into(staging, run_dir, last=marker.name)
    return run_dir / weights.relative_to(staging)


def _move_into(staging: Path, run_dir: Path, last: str) -> None:
    """Move each file and folder of `staging` into `run_dir`, replacing what is there; `last` (the file that
    says the run has weights) is removed first and moved in last. Renames only: no space needed."""
    (run_dir / last).unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == last):
        target = run_dir / entry.name
        atomic.remove(target)
        entry.replace(target)
    staging.rmdir()


def _save_lora(config: TrainConfig, parts: Components, denoiser: torch.nn.Module,
               text_encoders: Sequence[torch.nn.Module], run_dir: Path) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def lora_state(model: torch.nn.Module) -> dict:
        # No embedding layers are trained; "auto" would ask the Hub whether the base model's
        # vocabulary changed (a network call, and a warning, at every save of the text encoder).
        state = get_peft_model_state_dict(model, save_embedding_layers=False)
        # diffusers' UNet scripts rename PEFT's keys to its older (lora.down/up) layout; its transformer
        # scripts (SD 3, FLUX) keep PEFT's, which is what their pipelines load.
        return convert_state_dict_to_diffusers(state) if parts.family.denoiser_name == "unet" else state

    trained = {parts.family.denoiser_name: denoiser}
    if config.train_text_encoder:
        trainable = text_encoders[: parts.family.trainable_text_encoders]
        trained.update(zip(parts.family.text_encoder_names(len(trainable)), trainable, strict=True))
    layers = {part: lora_state(model) for part, model in trained.items()}
    metadata = {part: model.peft_config["default"].to_dict() for part, model in trained.items()}
    weights = parts.family.save_lora(run_dir, layers, metadata)
    if parts.family.writes_kohya_lora:
        save_kohya_lora(parts.family, run_dir, rank=config.lora_rank, alpha=config.lora_alpha or config.lora_rank)
    return weights


def save_kohya_lora(family, run_dir: Path, rank: int, alpha: float) -> Path:
    """The run's LoRA in the layout A1111, ComfyUI and kohya's tools load (diffusers' converter, then
    the two things it leaves out: the run's real alpha, and the text encoders' `text_model` level,
    which transformers 5's CLIPTextModel no longer has but those tools expect)."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    diffusers_state = load_file(run_dir / LORA_WEIGHTS)
    peft_state: dict[str, torch.Tensor] = {}
    for part in {key.split(".", 1)[0] for key in diffusers_state}:  # the file mixes two key styles: one at a time
        peft_state.update(convert_all_state_dict_to_peft(
            {k: v for k, v in diffusers_state.items() if k.split(".", 1)[0] == part}))
    kohya = convert_state_dict_to_kohya(peft_state)
    out: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        for ours, theirs in family.kohya_prefixes.items():
            key = key.replace(ours, theirs, 1) if key.startswith(ours) else key
        if key.startswith("lora_te") and "_text_model_" not in key:
            head, _, rest = key.partition("_encoder_")  # lora_te1 _encoder_ layers_0_... -> text_model_encoder
            key = f"{head}_text_model_encoder_{rest}"
        out[key] = torch.tensor(float(alpha)) if key.endswith(".alpha") else value.contiguous()
    path = run_dir / KOHYA_LORA_WEIGHTS
    save_file(out, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                   "ss_network_alpha": str(alpha)})
    return path
