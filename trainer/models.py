"""Load the base model's parts, freeze what is frozen, add LoRA, choose dtypes."""

from __future__ import annotations

import importlib.util

import torch

from trainer.config import TrainConfig
from trainer.families import Components, ModelLoadError, detect_family
from trainer.families.base import first_line
from trainer.speed import enable_checkpointing

__all__ = ["Components", "ModelLoadError", "load_components", "prepare_for_training", "weight_dtype"]


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """Dtype of the frozen modules; trainable weights always stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_components(config: TrainConfig) -> Components:
    """The base model's family, read from its model_index.json first (an unsupported one is
    refused before any weights load), then its parts through `from_pretrained`."""
    family = detect_family(config.pretrained_model, config.revision)
    parts = family.load_components(config.pretrained_model, config.revision, config.variant)
    parts.config = config
    if config.quantize_base != "none":
        from trainer.quantize import quantize

        dtype = weight_dtype(config.mixed_precision)
        quantize(parts.denoiser, config.quantize_base, family.quantized_blocks, dtype)
        for index in family.quantized_text_encoders:  # T5's linear layers all sit in its encoder stack
            quantize(parts.text_encoders[index], config.quantize_base, ("encoder",), dtype)
    if config.pretrained_vae:
        parts.vae = load_vae(config.pretrained_vae, parts)
    return parts


def load_vae(source: str, parts: Components):
    """A separate VAE, checked against the base model before its weights load: it must be an
    AutoencoderKL whose latents the UNet takes (channels) at the base VAE's downsampling."""
    from diffusers import AutoencoderKL

    def fail(problem: str) -> ModelLoadError:
        return ModelLoadError(f"`pretrained_vae`: {source!r} {problem}")

    try:
        found = AutoencoderKL.load_config(source)
    except (OSError, ValueError) as err:
        raise fail(f"could not be loaded: {first_line(err)}") from None
    if found.get("_class_name") != "AutoencoderKL":
        raise fail(f"is a {found.get('_class_name')}, not an AutoencoderKL")
    channels, base = found.get("latent_channels", 4), parts.vae.config
    takes = parts.family.latent_channels(parts)
    if channels != takes:
        raise fail(f"makes {channels}-channel latents; this {parts.family.label} model takes {takes}")
    if len(found.get("block_out_channels", ())) != len(base.block_out_channels):
        raise fail(f"downsamples by 2^{len(found.get('block_out_channels', ())) - 1}, the base VAE by "
                   f"2^{len(base.block_out_channels) - 1}")
    try:
        return AutoencoderKL.from_pretrained(source, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise fail(f"could not be loaded: {first_line(err)}") from None


def prepare_for_training(parts: Components, config: TrainConfig, device: torch.device) -> str | None:
    """Freeze, attach LoRA adapters, set dtypes and memory savers, in place; the line that says how
    gradient checkpointing runs (None when it is off).

    Frozen modules sit in the mixed-precision dtype to halve their memory; every trainable
    parameter is fp32, because fp16 master weights are what makes GradScaler fail with
    "Attempting to unscale FP16 gradients".
    """
    frozen_dtype = weight_dtype(config.mixed_precision)
    text_encoders = parts.text_encoders
    mark_trainable(parts, config)

    # The VAE is never trained; it stays fp32 under fp16 because SD's and SDXL's VAEs overflow in fp16.
    parts.vae.to(device)
    if config.mixed_precision == "bf16":
        parts.vae.to(dtype=frozen_dtype)
    for module in (parts.denoiser, *text_encoders):
        module.to(device)
        if frozen_dtype != torch.float32:
            module.to(dtype=frozen_dtype)
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    checkpointing = None
    if config.gradient_checkpointing:
        checkpointing = enable_checkpointing(parts.denoiser, config.resolution // parts.vae_scale_factor)
    parts.vae.eval()
    parts.denoiser.train()
    trained = parts.trainable_text_encoders if config.train_text_encoder else []
    for text_encoder in text_encoders:
        if config.gradient_checkpointing and text_encoder in trained:
            text_encoder.activation_checkpointing_enable()
        text_encoder.train(text_encoder in trained)
    return checkpointing


def mark_trainable(parts: Components, config: TrainConfig) -> None:
    """Freeze what the method leaves alone and attach LoRA adapters: the modules then have exactly the
    trainable parameters a checkpoint of this config holds (trainable_state_dict)."""
    text_encoders = parts.text_encoders
    parts.vae.requires_grad_(False)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    parts.denoiser.requires_grad_(config.method == "full")

    if config.method == "lora":
        from peft import LoraConfig

        alpha = config.lora_alpha or config.lora_rank

        def lora(targets: tuple[str, ...]) -> LoraConfig:
            return LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                              target_modules=list(targets))

        parts.denoiser.add_adapter(lora(parts.family.denoiser_lora_targets))
        for text_encoder in parts.trainable_text_encoders if config.train_text_encoder else ():
            text_encoder.add_adapter(lora(parts.family.text_lora_targets))
    elif config.train_text_encoder:
        for text_encoder in parts.trainable_text_encoders:
            text_encoder.requires_grad_(True)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name: what a checkpoint must hold to restore the run."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k in names}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = {name for name, p in module.named_parameters() if p.requires_grad}
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ModelLoadError(
            f"checkpoint does not match the {what}: {len(missing)} missing and {len(extra)} unexpected "
            f"tensors (was it made with another method or base model?)"
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def eight_bit_adam(config: TrainConfig) -> bool:
    """8-bit AdamW when asked for and bitsandbytes is installed (the engine falls back to torch's)."""
    return config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is not None
