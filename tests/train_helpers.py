"""Helpers for training tests: a small config, weight comparisons, a fixed-noise denoising loss."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer import TrainConfig
from trainer.data.photos import ImageSet, prepare_image


def tiny_config(model: Path, images: Path, out: Path, **changes) -> TrainConfig:
    """A config that trains the tiny model in about a second on CPU."""
    base = TrainConfig(
        pretrained_model=str(model),
        instance_data=(str(images),),
        identifier="sks",
        instance_prompt="a photo of sks square",
        output_dir=str(out),
        resolution=32,
        max_train_steps=6,
        method="lora",
        use_8bit_adam=True,
        gradient_checkpointing=False,
        checkpointing_steps=1000,
        validation_inference_steps=2,
        class_inference_steps=2,
        report_to="none",
        seed=0,
    )
    return base.replace(**changes)


def safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@torch.no_grad()
def denoising_loss(model_dir: Path, images: Path, prompt: str, lora_dir: Path | None = None,
                   resolution: int = 32, draws: int = 64) -> float:
    """The training objective's MSE of a model on the images, over fixed noise and timesteps.

    The training loss is noisy (random timesteps each step); this is the same quantity averaged
    over the same draws for every model compared, so a drop means the model learned the images.
    The prompt is encoded, the noise drawn and the denoiser called as the engine's model family does
    (DDPM for SD 1.x/SDXL, flow matching for SD 3/FLUX).
    """
    from diffusers import DDPMScheduler

    from trainer.families import Components, detect_family
    from trainer.loss import Denoising
    from trainer.run_folder import load_pipeline

    pipe = load_pipeline(model_dir, torch.float32, lora_dir=lora_dir)
    family = detect_family(str(model_dir))
    denoiser = getattr(pipe, family.denoiser_name)
    schedule = DDPMScheduler if isinstance(family.objective, Denoising) else type(pipe.scheduler)
    scheduler = schedule.from_config(pipe.scheduler.config)  # the training noise schedule
    parts = Components(family, pipe.tokenizer, pipe.text_encoder, pipe.vae, denoiser, scheduler,
                       **{name: getattr(pipe, name, None) for name in ("tokenizer_2", "text_encoder_2",
                                                                        "tokenizer_3", "text_encoder_3")})
    parts.config = TrainConfig(max_sequence_length=16)
    paths = sorted(p for p in images.iterdir() if p.suffix == ".png")
    image_set = ImageSet(paths)
    pixels = torch.stack([prepare_image(image_set.image(i), resolution, True, False) for i in range(len(paths))])
    vae = pipe.vae.config
    latents = (pipe.vae.encode(pixels).latent_dist.mean - (vae.shift_factor or 0.0)) * vae.scaling_factor
    cond = family.encode(parts, torch.stack([family.tokenize(parts, prompt)] * len(paths)))
    info = torch.tensor([[*image_set.original_size(i), 0, 0, resolution, resolution] for i in range(len(paths))],
                        dtype=torch.float32)  # the square images are resized, so the centre crop is at 0, 0
    total = 0.0
    rounds = draws // len(paths)
    for r in range(rounds):
        gens = [torch.Generator().manual_seed(1234 + r * len(paths) + i) for i in range(len(paths))]
        noised = family.objective.noised(scheduler, latents, gens, parts.config)
        pred = family.predict(denoiser, noised.noisy, noised.timesteps, cond, info)
        total += torch.nn.functional.mse_loss(pred, noised.target).item()
    return total / rounds
