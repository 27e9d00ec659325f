"""TrainConfig: the one typed object that crosses from the UI or CLI into the engine."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Method = Literal["full", "lora"]
Precision = Literal["no", "fp16", "bf16"]
Reporter = Literal["tensorboard", "wandb", "none"]

METHODS: tuple[str, ...] = ("full", "lora")
PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
REPORTERS: tuple[str, ...] = ("tensorboard", "wandb", "none")
LR_SCHEDULERS: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
# Learning rates of diffusers' DreamBooth scripts, used when `learning_rate` is left unset.
DEFAULT_LR: dict[str, float] = {"full": 5e-6, "lora": 1e-4}


class UserError(Exception):
    """An error whose message is written for the user: shown as it is, never as a traceback."""


class ConfigError(UserError, ValueError):
    """A TrainConfig field holds a value the engine cannot use; the message names the field."""


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a DreamBooth run. Field docs double as the CLI's --help text."""

    # --- what to train on -------------------------------------------------------------
    pretrained_model: str = field(
        default="", metadata={"help": "Base model: a Hub id or a local diffusers folder."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the base model."})
    variant: str | None = field(
        default=None, metadata={"help": "Weight variant of the base model, e.g. fp16."}
    )
    pretrained_vae: str | None = field(
        default=None,
        metadata={"help": "A separate VAE (Hub id or folder) used instead of the base model's to encode the "
                          "photos and decode class images and samples, and saved into a full run; e.g. "
                          "madebyollin/sdxl-vae-fp16-fix for SDXL under fp16."},
    )
    instance_data: tuple[str, ...] = field(
        default=(), metadata={"help": "Instance images: folders and/or image files."}
    )
    identifier: str = field(
        default="sks", metadata={"help": "The rare token that names the subject."}
    )
    instance_prompt: str = field(
        default="", metadata={"help": "Prompt of the instance images; must contain the identifier."}
    )
    caption_extension: str = field(
        default=".txt",
        metadata={"help": "A text file beside an instance image with this suffix (dog1.jpg -> dog1.txt) is that "
                          "image's own prompt instead of instance_prompt; it must contain the identifier. "
                          "Describe in it what is not the subject (\"... on a beach\"). Empty: ignore such files."},
    )
    output_dir: str = field(default="", metadata={"help": "Run folder to create or resume."})

    # --- prior preservation -----------------------------------------------------------
    with_prior_preservation: bool = field(
        default=False, metadata={"help": "Add the prior-preservation loss on class images."}
    )
    class_prompt: str = field(default="", metadata={"help": "Prompt of the class images."})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the prior loss."})
    num_class_images: int = field(
        default=100, metadata={"help": "Class images to use; missing ones are generated."}
    )
    class_data_dir: str | None = field(
        default=None, metadata={"help": "Your own class-image folder (generation tops it up)."}
    )
    class_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of generated class images (default ~/.cache/dreambooth-studio)."},
    )
    sample_batch_size: int = field(
        default=4, metadata={"help": "Batch size when generating class images."}
    )
    class_inference_steps: int = field(
        default=25, metadata={"help": "Denoising steps per generated class image."}
    )

    # --- method -----------------------------------------------------------------------
    method: Method = field(default="lora", metadata={"help": "full (whole UNet) or lora."})
    train_text_encoder: bool = field(
        default=False, metadata={"help": "Also train the text encoder (full weights or LoRA)."}
    )
    text_encoder_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the text encoder (default: learning_rate)."}
    )
    text_encoder_steps_fraction: float = field(
        default=1.0,
        metadata={"help": "Fraction of the steps after which the text encoder stops training."},
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: rank)."})

    # --- data -------------------------------------------------------------------------
    resolution: int = field(default=512, metadata={"help": "Training resolution in pixels."})
    center_crop: bool = field(
        default=True, metadata={"help": "Center crop (otherwise random crop) after resizing."}
    )
    random_flip: bool = field(default=False, metadata={"help": "Random horizontal flip."})

    # --- optimisation -----------------------------------------------------------------
    max_train_steps: int = field(default=400, metadata={"help": "Optimizer steps to train."})
    train_batch_size: int = field(default=1, metadata={"help": "Instance images per step."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches accumulated per optimizer step."}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate (default 5e-6 full, 1e-4 LoRA)."}
    )
    lr_scheduler: str = field(default="constant", metadata={"help": "LR schedule."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "LR warm-up steps."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    use_8bit_adam: bool = field(
        default=True, metadata={"help": "8-bit AdamW from bitsandbytes (falls back to torch)."}
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Trade compute for memory in UNet and text encoder."}
    )
    mixed_precision: Precision = field(
        default="no", metadata={"help": "no, fp16 (CUDA only) or bf16; trainable weights stay fp32."}
    )
    snr_gamma: float | None = field(
        default=None, metadata={"help": "Min-SNR-gamma loss weighting (5.0 is usual)."}
    )
    offset_noise: float = field(default=0.0, metadata={"help": "Offset-noise strength (0.1 usual)."})
    cache_latents: bool = field(
        default=True, metadata={"help": "Encode images with the VAE once (when not augmenting)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of data order, noise and samples."})

    # --- checkpoints, samples, logs ---------------------------------------------------
    checkpointing_steps: int = field(default=500, metadata={"help": "Checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "Keep only the last K checkpoints."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."}
    )
    validation_prompts: tuple[str, ...] = field(
        default=(), metadata={"help": "Prompts sampled every validation_steps (fixed seeds)."}
    )
    validation_steps: int = field(default=100, metadata={"help": "Sample every N steps."})
    num_validation_images: int = field(default=1, metadata={"help": "Images per prompt."})
    validation_inference_steps: int = field(
        default=25, metadata={"help": "Denoising steps of validation samples."}
    )
    validation_guidance_scale: float = field(
        default=7.5, metadata={"help": "Guidance scale of validation samples."}
    )
    report_to: Reporter = field(
        default="tensorboard", metadata={"help": "Tracker: tensorboard, wandb or none."}
    )

    # ----------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    @property
    def te_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.lr

    @property
    def augments(self) -> bool:
        """Random augmentation means latents differ between epochs and cannot be cached."""
        return self.random_flip or not self.center_crop

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad field; return self so calls chain."""
        _check(self.pretrained_model.strip() != "", "pretrained_model", "is required (a Hub id or a local folder)")
        _check(len(self.instance_data) > 0, "instance_data", "is required (a folder or image files)")
        _check(self.output_dir.strip() != "", "output_dir", "is required")
        ident = self.identifier.strip()
        _check(ident != "" and " " not in ident, "identifier", f"must be one word, got {self.identifier!r}")
        _check(self.instance_prompt.strip() != "", "instance_prompt", "is required")
        _check(
            ident in self.instance_prompt.split(),
            "instance_prompt",
            f"must contain the identifier {ident!r} as a word, got {self.instance_prompt!r}",
        )
        ext = self.caption_extension
        _check(
            ext == "" or (ext.startswith(".") and len(ext) > 1 and not any(c in ext for c in "/\\ ")),
            "caption_extension",
            f"must be a file suffix such as '.txt', or empty to ignore caption files, got {ext!r}",
        )
        if self.with_prior_preservation:
            _check(self.class_prompt.strip() != "", "class_prompt", "is required with prior preservation")
            _check(
                ident not in self.class_prompt.split(),
                "class_prompt",
                f"must not contain the identifier {ident!r}: it describes the class, not the subject",
            )
            _check(self.num_class_images >= 1, "num_class_images", f"must be at least 1, got {self.num_class_images}")
            _check(self.prior_loss_weight >= 0, "prior_loss_weight", f"must be >= 0, got {self.prior_loss_weight}")
        _check(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check(
            self.mixed_precision in PRECISIONS,
            "mixed_precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}",
        )
        _check(self.report_to in REPORTERS, "report_to", f"must be one of {', '.join(REPORTERS)}, got {self.report_to!r}")
        _check(
            self.lr_scheduler in LR_SCHEDULERS,
            "lr_scheduler",
            f"must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}",
        )
        _check(
            self.resolution >= 8 and self.resolution % 8 == 0,
            "resolution",
            f"must be a positive multiple of 8, got {self.resolution}",
        )
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "lora_rank",
                     "checkpointing_steps", "validation_steps", "num_validation_images",
                     "sample_batch_size", "class_inference_steps", "validation_inference_steps"):
            value = getattr(self, name)
            _check(value >= 1, name, f"must be at least 1, got {value}")
        _check(self.lr > 0, "learning_rate", f"must be > 0, got {self.lr}")
        _check(self.te_lr > 0, "text_encoder_lr", f"must be > 0, got {self.te_lr}")
        _check(
            0.0 < self.text_encoder_steps_fraction <= 1.0,
            "text_encoder_steps_fraction",
            f"must be in (0, 1], got {self.text_encoder_steps_fraction}",
        )
        _check(self.lr_warmup_steps >= 0, "lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        _check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _check(self.offset_noise >= 0, "offset_noise", f"must be >= 0, got {self.offset_noise}")
        _check(self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma", f"must be > 0, got {self.snr_gamma}")
        _check(
            self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}"
        )
        _check(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            "checkpoints_total_limit",
            f"must be at least 1, got {self.checkpoints_total_limit}",
        )
        return self

    # --- (de)serialisation: the run folder's config.json ------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        values = dict(data)
        for name in ("instance_data", "validation_prompts"):
            if name in values and values[name] is not None:
                raw = values[name]
                values[name] = (raw,) if isinstance(raw, str) else tuple(raw)
        return cls(**values)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields")
        return cls.from_dict(data)


def _check(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"`{name}` {problem}")
