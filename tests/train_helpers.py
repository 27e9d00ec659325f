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
    """The epsilon-MSE of a model on the images, over fixed noise and timesteps.

    The training loss is noisy (random timesteps each step); this is the same quantity averaged
    over the same draws for every model compared, so a drop means the model learned the images.
    The prompt is encoded and the UNet called as the engine's model family does (SD or SDXL).
    """
    from diffusers import DDPMScheduler

    from trainer.families import Components, detect_family
    from trainer.run_folder import load_pipeline

    pipe = load_pipeline(model_dir, torch.float32, lora_dir=lora_dir)
    family = detect_family(str(model_dir))
    parts = Components(family, pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler,
                       tokenizer_2=getattr(pipe, "tokenizer_2", None), text_encoder_2=getattr(pipe, "text_encoder_2", None))
    paths = sorted(p for p in images.iterdir() if p.suffix == ".png")
    image_set = ImageSet(paths)
    pixels = torch.stack([prepare_image(image_set.image(i), resolution, True, False) for i in range(len(paths))])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    cond = family.encode(parts, torch.stack([family.tokenize(parts, prompt)] * len(paths)))
    info = torch.tensor([[*image_set.original_size(i), 0, 0, resolution, resolution] for i in range(len(paths))],
                        dtype=torch.float32)  # the square images are resized, so the centre crop is at 0, 0
    gen = torch.Generator().manual_seed(1234)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
    total = 0.0
    for _ in range(draws // len(paths)):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(paths),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        total += torch.nn.functional.mse_loss(family.predict(pipe.unet, noisy, t, cond, info), noise).item()
    return total / (draws // len(paths))
