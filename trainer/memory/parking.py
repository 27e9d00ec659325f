"""Frozen parts a training step does not use wait in CPU RAM while the steps run on a GPU.

Once every photo's latents are cached the VAE has nothing to do until the next validation sample,
and a frozen text encoder has nothing to do once the embedding of every prompt a step can draw (each
photo's caption or the instance prompt, the class prompt) is cached. On a GPU they leave the card
for the steps and come back for samples, scores and the saved pipeline: for SD 1.5 under fp16 that
is 0.54 GiB (the fp32 VAE and the half-precision text encoder) more for gradients and activations,
which is what takes full fine-tuning at 512 px under 10 GB (`trainer.memory.estimate` counts it the same
way: `parked_parts`). diffusers' scripts delete them for the same reason, and only when nothing
needs them again: the text encoders once the prompts are embedded (train_dreambooth_lora_sdxl.py;
`--pre_compute_text_embeddings`), the VAE once latents are cached and no validation prompt is given
(train_dreambooth_lora_sdxl_advanced.py). Here they stay loaded, so samples and scores still run;
on the CPU they do not move, being already where they would wait. Frozen text encoders that nothing
needs again (no validation prompts, no scores, a LoRA) are freed instead, on any device: for FLUX.1
that is T5-XXL's 9.5 GB (bf16), also when the photos have their own captions (all are embedded first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from trainer.config import TrainConfig
from trainer.families import Components
from trainer.model_files import TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, TEXT_ENCODERS, text_encoder_names


def parked_parts(config: TrainConfig, text_encoder_names: Sequence[str], device_type: str) -> list[str]:
    """The parts (by their names in the base model's folder) that wait in CPU RAM during the steps of
    `config` on `device_type`: on a GPU, those the steps do not use."""
    return unused_by_steps(config, text_encoder_names) if device_type == "cuda" else []


def unused_by_steps(config: TrainConfig, text_encoder_names: Sequence[str]) -> list[str]:
    """The VAE when latents are cached, the text encoders when none trains (a step that trains CLIP
    encodes its prompts anew, with FLUX's and SD 3's T5 beside it)."""
    names = ["vae"] if config.cache_latents and not config.augments else []
    return names + ([] if config.train_text_encoder else list(text_encoder_names))


def needed_again(config: TrainConfig) -> bool:
    """Whether anything after the steps start uses the frozen text encoders: samples, scores, or the
    complete pipeline a full fine-tune saves."""
    return bool(config.validation_prompts) or config.score_checkpoints or config.method == "full"


def _empty(module: torch.nn.Module) -> None:
    """Every tensor of the module replaced by an empty one on the meta device: its memory goes back to the
    system, the module object stays. (Not `module.to("meta")`: bitsandbytes' quantized weights refuse it.)"""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                           requires_grad=False)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")


def _bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def parking_device(device: torch.device) -> torch.device | None:
    """Where parked parts wait while steps run on `device`; None: they stay (the CPU is where they would go)."""
    return torch.device("cpu") if device.type == "cuda" else None


class Parking:
    """The parked parts of one run, and moving them off the device and back."""

    def __init__(self, modules: dict[str, torch.nn.Module], home: torch.device, away: torch.device | None,
                 freed: dict[str, torch.nn.Module] | None = None) -> None:
        self.modules, self.home, self.away = modules, home, away
        self.freed = freed or {}  # gone for good at park(): nothing needs them again
        self.parked = False

    @classmethod
    def for_run(cls, config: TrainConfig, parts: Components, device: torch.device) -> Parking | None:
        names = text_encoder_names(len(parts.text_encoders))
        by_name = dict(zip(names, parts.text_encoders, strict=True)) | {"vae": parts.vae}
        chosen = unused_by_steps(config, names)
        freed = {name: by_name[name] for name in chosen if name in TEXT_ENCODERS and not needed_again(config)}
        away = parking_device(device)
        kept = {name: by_name[name] for name in chosen if name not in freed} if away is not None else {}
        return cls(kept, device, away, freed) if kept or freed else None

    @property
    def text_encoders(self) -> bool:
        """Whether text encoders park or are freed (then every prompt's embedding must be cached first)."""
        return any(name in TEXT_ENCODERS for name in (*self.modules, *self.freed))

    def bytes(self) -> int:
        return _bytes(self.modules.values())

    def describe(self) -> str:
        names = {"vae": "the VAE", TEXT_ENCODER: "the text encoder", TEXT_ENCODER_2: "the second text encoder",
                 TEXT_ENCODER_3: "the third text encoder"}
        lines = []
        if self.modules:
            which = " and ".join(names[n] for n in self.modules)
            verb = "wait" if len(self.modules) > 1 else "waits"
            lines.append(f"{which} {verb} in CPU RAM during the steps ({self.bytes() / 2**30:.2f} GiB more for "
                         "training on the GPU) and come back for samples, scores and saving")
        if self.freed:
            which = " and ".join(names[n] for n in self.freed)
            lines.append(f"{which} {'are' if len(self.freed) > 1 else 'is'} freed once every prompt is embedded "
                         f"({_bytes(self.freed.values()) / 2**30:.2f} GiB): no sample, score or saved pipeline "
                         "needs them again")
        return "Memory: " + "; ".join(lines)

    def park(self) -> None:
        for module in self.freed.values():
            _empty(module)
        if not self.parked:
            self._move(self.away)
            self.parked = True
            if self.home.type == "cuda":
                torch.cuda.empty_cache()  # their blocks go back to the card, not only to torch's cache

    def unpark(self) -> None:
        if self.parked:
            self._move(self.home)
            self.parked = False

    @contextlib.contextmanager
    def unparked(self) -> Iterator[None]:
        """The parts on the device for the block (samples, scores), then parked again if they were."""
        was = self.parked
        self.unpark()
        try:
            yield
        finally:
            if was:
                self.park()

    def _move(self, device: torch.device) -> None:
        for module in self.modules.values():
            module.to(device)
