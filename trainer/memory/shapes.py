"""The shapes of a base model's parts, from its config files alone (never its weights).

`read_shapes` reads the config.json of each part (a local folder, the Hub, or only the Hub's local
cache); `build_parts` builds the parts on the meta device, where a 2.6 B-parameter UNet takes no
memory and a fraction of a second. When the config files cannot be read (offline, a Hub id never
downloaded), the family's known architecture stands in, and the shapes say so.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from typing import Any

import torch

from trainer.config import UserError
from trainer.families import Components, ModelFamily, family_by_name, family_for_class, read_model_index
from trainer.families.base import first_line
from trainer.model_files import TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODERS, text_encoder_names

# fmt: off
_CLIP_L = {  # openai/clip-vit-large-patch14's text tower: SD 1.x's encoder, SDXL's first
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_CLIP_BIG_G = {  # OpenCLIP ViT-bigG/14's text tower, with its projection: SDXL's second encoder
    **_CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
    "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu",
}
_VAE = {  # the SD VAE (also SDXL's shape): 8x downsampling, 4 latent channels
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215,
}
# The released configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (the architecture
# keys; diffusers fills the rest with its defaults). Built, they have the parameter counts of the
# releases: SD 1.5 UNet 859.5 M, CLIP-L 123.1 M, VAE 83.7 M; SDXL UNet 2,567.5 M, bigG 694.7 M.
KNOWN_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd": {
        "unet": {
            "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "norm_num_groups": 32,
        },
        TEXT_ENCODER: _CLIP_L,
        "vae": _VAE,
    },
    "sdxl": {
        "unet": {
            "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
        },
        TEXT_ENCODER: _CLIP_L,
        TEXT_ENCODER_2: _CLIP_BIG_G,
        "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    },
}
# fmt: on
KNOWN_LABELS = {"sd": "Stable Diffusion 1.5", "sdxl": "SDXL base 1.0"}


class UnsizedFamilyError(UserError, RuntimeError):
    """The base model is of a family the memory model does not size (yet): SD 3, FLUX."""


@dataclass(frozen=True, eq=False)
class ModelShapes:
    """The configs of a base model's parts, and where they came from. Equal (and hashed) by
    architecture, so that caches keyed by shapes serve any source of the same model."""

    family: ModelFamily
    configs: dict[str, dict[str, Any]]  # "unet", "text_encoder"[, "text_encoder_2"], "vae"
    fallback: str | None = None  # why the family's known architecture stands in, when it does

    @functools.cached_property
    def key(self) -> str:
        """A digest of the architecture: equal shapes read from any source share their traces."""
        text = json.dumps({"family": self.family.name, **_architecture(self.configs)}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelShapes) and other.key == self.key

    @property
    def text_encoder_names(self) -> list[str]:
        return [name for name in TEXT_ENCODERS if name in self.configs]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.configs["unet"].get("sample_size", 64)) * self.vae_scale_factor


# What does not change a part's tensors: the image size it was trained at, latent scaling, dtypes.
_NOT_SHAPE = {"sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast"}
# The keys of a CLIP text config that decide its tensors (the rest are token ids and bookkeeping).
_CLIP_SHAPE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
)


def _architecture(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each config with its class's defaults filled in and only the keys that shape tensors: a
    Hub config.json, a local one and KNOWN_CONFIGS of the same model compare equal."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    out = {}
    for name, config in configs.items():
        if name in TEXT_ENCODERS:
            full = CLIPTextConfig(**config).to_dict()
            out[name] = {key: full.get(key) for key in _CLIP_SHAPE}
            continue
        params = inspect.signature((UNet2DConditionModel if name == "unet" else AutoencoderKL).__init__).parameters
        values = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        values.update({k: v for k, v in config.items() if k in params})
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if k not in _NOT_SHAPE}
    return out


def known_shapes(family_name: str, why: str) -> ModelShapes:
    """The family's known architecture (KNOWN_CONFIGS), saying why it stands in."""
    return ModelShapes(
        family_by_name(family_name),
        KNOWN_CONFIGS[family_name],
        fallback=f"{why}; assuming the {KNOWN_LABELS[family_name]} architecture",
    )


def read_shapes(
    source: str,
    revision: str | None = None,
    pretrained_vae: str | None = None,
    *,
    local_only: bool = False,
    family: str | None = None,
) -> ModelShapes:
    """The config of each part of `source`. `local_only` never touches the network (a folder or the
    Hub cache). Unreadable configs fall back to the known architecture of `family` (the one named, else
    the one its model_index.json names); with no family to go by, the loader's error is raised."""
    from trainer.families import ModelLoadError

    try:
        found = family_for_class(read_model_index(source, revision, cached_only=local_only).get("_class_name"), source)
        if found.name not in KNOWN_CONFIGS:
            sized = " and ".join(family_by_name(name).label for name in KNOWN_CONFIGS)
            raise UnsizedFamilyError(
                f"`pretrained_model`: {source} is a {found.label} model; the memory model sizes {sized} only so far "
                "(the app picks SD 3 and FLUX settings from the peaks their trainers publish)")
        configs = _read_configs(found, source, revision, pretrained_vae, local_only)
        return ModelShapes(found, configs)
    except UnsizedFamilyError:
        raise
    except (ModelLoadError, OSError, ValueError) as err:
        name = family or (found.name if "found" in locals() else None)
        if name not in KNOWN_CONFIGS:
            raise
        return known_shapes(name, f"the config files of {source!r} could not be read ({first_line(err)})")


def _read_configs(
    family: ModelFamily, source: str, revision: str | None, pretrained_vae: str | None, local_only: bool
) -> dict[str, dict[str, Any]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    options = {"revision": revision, "local_files_only": local_only}
    configs = {"unet": dict(UNet2DConditionModel.load_config(source, subfolder="unet", **options))}
    names = text_encoder_names(2 if family.name == "sdxl" else 1)
    for name in names:
        configs[name] = CLIPTextConfig.from_pretrained(source, subfolder=name, **options).to_diff_dict()
    if pretrained_vae:
        configs["vae"] = dict(AutoencoderKL.load_config(pretrained_vae, local_files_only=local_only))
    else:
        configs["vae"] = dict(AutoencoderKL.load_config(source, subfolder="vae", **options))
    # Private keys (_diffusers_version, _name_or_path, ...) say nothing of the shapes.
    return {name: {k: v for k, v in config.items() if not k.startswith("_")} for name, config in configs.items()}


def build_parts(shapes: ModelShapes) -> Components:
    """The parts on the meta device, as `from_pretrained` builds them (fp32), without weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shapes.configs["unet"])
        vae = AutoencoderKL.from_config(shapes.configs["vae"])
        encoders = [
            (CLIPTextModelWithProjection if name == TEXT_ENCODER_2 else CLIPTextModel)(
                CLIPTextConfig(**shapes.configs[name])
            )
            for name in shapes.text_encoder_names
        ]
    second = encoders[1] if len(encoders) > 1 else None
    return Components(
        family=shapes.family,
        tokenizer=None,
        text_encoder=encoders[0],
        vae=vae,
        denoiser=unet,
        noise_scheduler=None,
        text_encoder_2=second,
    )


@functools.lru_cache(maxsize=16)
def pristine_parts(shapes: ModelShapes) -> Components:
    """The parts as built, kept: to be read, never set up (the traces build their own)."""
    return build_parts(shapes)


@dataclass(frozen=True)
class PartTensors:
    """What the memory model needs of one part: its tensors as built, and what LoRA would add."""

    params: tuple[int, ...]  # elements of each parameter
    float_buffers: int  # elements of floating-point buffers (cast with the part)
    other_buffers: int  # bytes of the others (token position ids)
    lora_targets: tuple[tuple[int, int], ...]  # (in, out) features of each Linear a LoRA adapter wraps


@functools.lru_cache(maxsize=16)
def part_tensors(shapes: ModelShapes) -> dict[str, PartTensors]:
    """Each part's PartTensors ("unet", "vae", "text_encoder"[, "text_encoder_2"]), from one meta build.
    LoRA wraps the Linear layers whose names end in the family's targets, as peft's target_modules."""
    parts = pristine_parts(shapes)
    modules = {
        "unet": parts.denoiser,
        "vae": parts.vae,
        **dict(zip(shapes.text_encoder_names, parts.text_encoders, strict=True)),
    }
    targets = {"unet": shapes.family.denoiser_lora_targets, "vae": ()}
    out = {}
    for name, module in modules.items():
        ends = tuple("." + t for t in targets.get(name, shapes.family.text_lora_targets))
        linears = [m for key, m in module.named_modules() if isinstance(m, torch.nn.Linear) and key.endswith(ends)]
        buffers = list(module.buffers())
        out[name] = PartTensors(
            params=tuple(p.numel() for p in module.parameters()),
            float_buffers=sum(b.numel() for b in buffers if b.is_floating_point()),
            other_buffers=sum(b.numel() * b.element_size() for b in buffers if not b.is_floating_point()),
            lora_targets=tuple((m.in_features, m.out_features) for m in linears),
        )
    return out


def parameter_counts(shapes: ModelShapes) -> dict[str, int]:
    """Parameters of each part, counted on the meta device."""
    return {name: sum(part.params) for name, part in part_tensors(shapes).items()}
