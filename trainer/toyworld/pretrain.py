"""Pretrain the toy Stable Diffusion on the toy world, on a CPU: VAE first, then UNet + text encoder.

    nice -n 15 python -m trainer.toyworld.pretrain --work runs/toy-pretrain --out trainer/assets/toy-sd

Stages run in order and each is skipped once done; every stage checkpoints to `--work`, so a killed
run continues where it stopped when started again with the same arguments.
1. vae      reconstruct random scenes (solid and split shapes), L1 + MSE + a tiny KL term
2. latents  encode a fixed set of solid-shape scenes from the training combinations, once
3. unet     UNet and text encoder together, epsilon loss on captions with attributes dropped at random
4. export   the EMA weights as a diffusers StableDiffusionPipeline folder, fp16 safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.model_files import TEXT_ENCODER
from trainer.toyworld import arch
from trainer.toyworld.world import all_combos, caption_for_training, random_scene, render_batch, train_combos


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _log(work: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with (work / "log.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train_vae(work: Path, steps: int, batch: int, seed: int) -> None:
    ckpt = work / "vae.pt"
    vae = arch.new_vae(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    started = time.monotonic()
    while step < steps:
        rng = random.Random(seed * 100_003 + step)  # the batch depends only on the step: resumable
        x = _to_tensor(render_batch([random_scene(rng, all_combos(), split_fraction=0.4) for _ in range(batch)]))
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == steps:
            _log(work, {"stage": "vae", "step": step, "loss": round(loss.item(), 5),
                        "minutes": round((time.monotonic() - started) / 60, 2)})
        if step % 250 == 0 or step == steps:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    # Scale latents to unit variance, as SD's scaling_factor does, measured on fresh scenes.
    with torch.no_grad():
        rng = random.Random(seed + 7)
        x = _to_tensor(render_batch([random_scene(rng, all_combos()) for _ in range(512)]))
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(work / "vae")


def encode_dataset(work: Path, count: int, seed: int) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    rng = random.Random(seed + 11)
    scenes = [random_scene(rng, train_combos()) for _ in range(count)]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, count, 500):
            dist = vae.encode(_to_tensor(render_batch(scenes[i:i + 500]))).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    torch.save({"mean": torch.cat(means), "std": torch.cat(stds), "scenes": scenes}, work / "latents.pt")


def train_unet(work: Path, steps: int, batch: int, lr: float, seed: int) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTokenizer

    from trainer.toyworld import CLIP_TOKENIZER_DIR as TOKENIZER_DIR

    data = torch.load(work / "latents.pt", weights_only=False)
    scale = AutoencoderKL.load_config(work / "vae")["scaling_factor"]
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    noise_scheduler = DDPMScheduler(**arch.SCHEDULER_CONFIG)
    unet, text_encoder = arch.new_unet(seed), arch.new_text_encoder(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ckpt, step = work / "unet.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    pairs = list(zip(list(unet.parameters()) + list(text_encoder.parameters()),
                     list(ema_unet.parameters()) + list(ema_text.parameters()), strict=True))
    started = time.monotonic()
    while step < steps:
        rng, gen = random.Random(seed * 100_003 + step), torch.Generator().manual_seed(seed * 100_003 + step)
        idx = torch.randint(0, len(data["scenes"]), (batch,), generator=gen)
        latents = data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)
        latents = latents * scale
        captions = [caption_for_training(data["scenes"][i], rng) for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, e in pairs:
                e.lerp_(p, 1 - decay)
        if step % 25 == 0 or step == steps:
            _log(work, {"stage": "unet", "step": step, "loss": round(loss.item(), 5),
                        "minutes": round((time.monotonic() - started) / 60, 2)})
        if step % 200 == 0 or step == steps:
            torch.save({"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step}, work / "unet.tmp")
            (work / "unet.tmp").replace(ckpt)


def export(work: Path, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the EMA weights as a pipeline folder that plain StableDiffusionPipeline loads."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from trainer.toyworld import CLIP_TOKENIZER_DIR as TOKENIZER_DIR

    state = torch.load(work / "unet.pt", weights_only=False)
    unet, text_encoder = arch.new_unet(), arch.new_text_encoder()
    unet.load_state_dict(state["ema_unet"])
    text_encoder.load_state_dict(state["ema_text"])
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"), text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), unet=unet,
        scheduler=DPMSolverMultistepScheduler(**arch.SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # vocab.json + merges.txt as SD 1.x ships them, instead of the larger tokenizer.json.
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(TOKENIZER_DIR, out / "tokenizer")
    # transformers loads a model in the dtype its config names; fp16 on disk, fp32 in memory keeps
    # the text encoder's output the same dtype as the (fp32-loaded) UNet on a CPU.
    config_path = out / TEXT_ENCODER / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Checkpoints and logs (resumable).")
    parser.add_argument("--out", type=Path, required=True, help="Where the pipeline folder is written.")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=30000, help="Scenes encoded for the UNet stage.")
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "vae" / "config.json").exists():
        train_vae(args.work, args.vae_steps, args.vae_batch, args.seed)
    if not (args.work / "latents.pt").exists():
        encode_dataset(args.work, args.scenes, args.seed)
    train_unet(args.work, args.unet_steps, args.unet_batch, args.unet_lr, args.seed)
    print(f"wrote {export(args.work, args.out)}")


if __name__ == "__main__":
    main()
