"""TrainConfig: the one typed object that crosses from the UI or CLI into the engine."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Method = Literal["full", "lora"]
Preservation = Literal["class-images", "base-prediction"]
Precision = Literal["no", "fp16", "bf16"]
Reporter = Literal["tensorboard", "wandb", "none"]
Quantization = Literal["none", "nf4", "int8"]
WeightingScheme = Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"]

METHODS: tuple[str, ...] = ("full", "lora")
PRESERVATIONS: tuple[str, ...] = ("class-images", "base-prediction")
PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
REPORTERS: tuple[str, ...] = ("tensorboard", "wandb", "none")
QUANTIZATIONS: tuple[str, ...] = ("none", "nf4", "int8")
WEIGHTING_SCHEMES: tuple[str, ...] = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap")
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
# numpy's seeds (accelerate's set_seed seeds numpy, random and torch together) are 32-bit.
MAX_SEED = 2**32 - 1
# SDXL trains at 1024 px; at 4096 px one image's latents already fill any GPU's memory, and a
# typo (40960) would first upscale the photos to a size that fills the machine's RAM.
MAX_RESOLUTION = 4096
MAX_LR = 1.0
MAX_PRIOR_LOSS_WEIGHT = 100.0  # beyond, the subject's own loss no longer counts
MAX_GUIDANCE = 50.0  # no Stable Diffusion model is sampled above ~20; beyond, images saturate to noise


class UserError(Exception):
    """An error whose message is written for the user: shown as it is, never as a traceback."""


class ConfigError(UserError, ValueError):
    """A TrainConfig field holds a value the engine cannot use; the message names the field
    (and `field` holds its name, when one field is to blame)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


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
    class_noun: str = field(
        default="",
        metadata={"help": "The class of the subject in a word or two (dog, backpack): the scores' new-context "
                          "prompts and the model card name it. Empty: the word after the identifier in the "
                          "instance prompt, else the class prompt's last word (set once, when the config is made)."},
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
        default=False, metadata={"help": "Add the prior-preservation loss (what it compares with: preservation)."}
    )
    preservation: Preservation = field(
        default="class-images",
        metadata={"help": "What the prior loss compares with: class-images (made by the base model first, the "
                          "paper's way) or base-prediction (no class images: the base model's own prediction for "
                          "the class prompt on the same noisy latents; LoRA disables its adapters for it, full "
                          "fine-tuning keeps a frozen copy of the UNet). On the CLI, --preservation none turns "
                          "prior preservation off."},
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
    quantize_base: Quantization = field(
        default="none",
        metadata={"help": "LoRA only: the base model's denoiser (and SD 3's or FLUX's frozen T5) in 4-bit NF4 or 8-bit "
                          "(bitsandbytes) while the LoRA trains in full precision (QLoRA): FLUX.1 in about a quarter "
                          "of its memory."},
    )
    mixed_precision: Precision = field(
        default="no", metadata={"help": "no, fp16 (CUDA only) or bf16; trainable weights stay fp32."}
    )
    snr_gamma: float | None = field(
        default=None, metadata={"help": "Min-SNR-gamma loss weighting (5.0 is usual)."}
    )
    offset_noise: float = field(default=0.0, metadata={"help": "Offset-noise strength (0.1 usual)."})
    # --- flow-matching models (SD 3, FLUX) ------------------------------------------------
    weighting_scheme: WeightingScheme = field(
        default="logit_normal",
        metadata={"help": "SD 3 / FLUX: how noise levels are drawn (logit_normal, mode, uniform) or rows weighted "
                          "(sigma_sqrt, cosmap), as diffusers' scripts."},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "logit_normal: mean."})
    logit_std: float = field(default=1.0, metadata={"help": "logit_normal: standard deviation."})
    mode_scale: float = field(default=1.29, metadata={"help": "mode: scale."})
    guidance: float = field(
        default=1.0,
        metadata={"help": "FLUX.1-dev (guidance-distilled): the guidance value the transformer is given while "
                          "training; sampling uses its own (3.5)."},
    )
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "T5 tokens per prompt (SD 3 / FLUX; default: FLUX 512, SD 3 77)."}
    )
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

    # --- scores of each checkpoint (trainer/scores/measure.py) --------------------------------
    score_checkpoints: bool = field(
        default=False, metadata={"help": "Score the base model and every checkpoint (subject and prompt fidelity, "
                                         "class drift, memorisation) and pick the best checkpoint."}
    )
    score_samples: int = field(default=4, metadata={"help": "Images per scoring prompt (fixed seeds 0..N-1)."})
    score_inference_steps: int = field(default=25, metadata={"help": "Denoising steps of scoring images."})
    score_image_model: str = field(
        default="facebook/dinov2-small",
        metadata={"help": "Image embedder of subject fidelity (a DINOv2 Hub id or folder; the toy world's judge "
                          "stands in for the toy model)."},
    )
    score_clip_model: str = field(
        default="openai/clip-vit-base-patch32",
        metadata={"help": "CLIP model of prompt fidelity and CLIP-I (a Hub id or folder)."},
    )

    # ----------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # The class noun is derived here, once, when not given: a run's config.json then records it, and an
        # older config.json without it gets the noun the card and the scores always took.
        if isinstance(self.class_noun, str) and not self.class_noun.strip():
            object.__setattr__(self, "class_noun",
                               derive_class_noun(self.identifier, self.instance_prompt, self.class_prompt))

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    @property
    def te_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.lr

    @property
    def class_images_used(self) -> bool:
        """Class images are made (or read) and trained on: prior preservation on class images."""
        return self.with_prior_preservation and self.preservation == "class-images"

    @property
    def from_base_prediction(self) -> bool:
        """The prior loss's target is the base model's prediction for the class prompt."""
        return self.with_prior_preservation and self.preservation == "base-prediction"

    @property
    def augments(self) -> bool:
        """Random augmentation means latents differ between epochs and cannot be cached."""
        return self.random_flip or not self.center_crop

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first bad field; return self so calls chain.

        Every field is checked here for its type, its range and its meaning, in the order of CHECKS,
        before anything is created, loaded or trained; what needs the disk is `check_locations`, what
        needs the tokenizer is `prompts.check_prompts`.
        """
        for check in CHECKS:
            for name, problem in check(self):
                raise ConfigError(f"`{name}` {problem}", field=name)
        return self

    # --- (de)serialisation: the run folder's config.json ------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A TrainConfig from a config.json's fields (JSON lists become tuples); the values are
        checked by `validate`, so any JSON value gets a message there rather than a TypeError here."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1))
                     else name for name in unknown]
            raise ConfigError(f"unknown config field(s): {', '.join(hints)}")
        values = dict(data)
        for name in ("instance_data", "validation_prompts"):
            raw = values.get(name)
            if isinstance(raw, str):
                values[name] = (raw,)
            elif isinstance(raw, list):
                values[name] = tuple(raw)
        return cls(**values)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """A config file (see `read_config_file`); its values are checked by `validate`."""
        return cls.from_dict(read_config_file(path))


def read_config_file(path: Path) -> dict[str, Any]:
    """The JSON object of a config file; ConfigError naming the file when it is missing, a folder,
    unreadable, not UTF-8, not JSON or not an object."""
    path = Path(path)
    if path.is_dir():
        hint = f" (did you mean {path / 'config.json'}?)" if (path / "config.json").is_file() else ""
        raise ConfigError(f"{path}: is a folder, not a config file{hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (expected a JSON config file)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config fields, got {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(type(value), "a number")


# --- types: what every field may hold, said in words -----------------------------------------
def _expected(tp: Any, name: str) -> str:
    """The words for what field `name` of type `tp` holds: "a whole number", "text or none", ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_expected(inner[0], name)} or none (null) for the default"
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return "a list of prompts" if name.endswith("prompts") else "a list of paths"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[tp]


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str)  # the value itself is checked with the field's meaning
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


def _text_problem(text: str) -> str | None:
    """What makes a string unusable as a prompt, a path or a name, if anything."""
    if "\x00" in text:
        return "must not contain a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: non-UTF-8 bytes given on the command line
        return f"is not valid UTF-8 text, got {text!r}"
    return None


# Fields that name files or folders, and the limits of the file systems they live on (Linux's
# NAME_MAX and PATH_MAX; longer names make every os call fail with "File name too long").
PATH_FIELDS: tuple[str, ...] = ("pretrained_model", "pretrained_vae", "instance_data", "output_dir",
                                "class_data_dir", "class_cache_dir", "resume_from_checkpoint")
MAX_NAME_BYTES, MAX_PATH_BYTES = 255, 4096


def _path_problem(path: str) -> str | None:
    longest = max((len(part.encode("utf-8")) for part in Path(path).parts), default=0)
    if longest > MAX_NAME_BYTES:
        return f"has a name of {longest} bytes; a file or folder name may have at most {MAX_NAME_BYTES}"
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        return f"is {len(path.encode('utf-8'))} bytes long; a path may have at most {MAX_PATH_BYTES}"
    return None


def _type_problems(config: TrainConfig) -> Iterator[Failure]:
    """Each field holds its type (JSON and the form can send anything), finite numbers, clean text."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, tp = getattr(config, f.name), hints[f.name]
        if not _fits(value, tp):
            yield f.name, f"must be {_expected(tp, f.name)}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            yield f.name, f"must be a finite number, got {value}"
        for i, text in enumerate(value if isinstance(value, tuple) else (value,)):
            if isinstance(text, str) and (problem := _text_problem(text)):
                yield (f.name if not isinstance(value, tuple) else f"{f.name}[{i}]"), problem


def derive_class_noun(identifier: str, instance_prompt: str, class_prompt: str) -> str:
    """The class word of the subject when none is given: the word after the identifier in the instance prompt
    ("dog"), else the class prompt's last word ("" when neither says; any value that is not text is left to
    `validate`)."""
    if not all(isinstance(text, str) for text in (identifier, instance_prompt, class_prompt)):
        return ""
    words = instance_prompt.split()
    if identifier in words:
        after = words[words.index(identifier) + 1 :]
        if after:
            return after[0].strip(".,;:!?")
    return class_prompt.split()[-1] if class_prompt.split() else ""


# --- validate: the table of checks, in the order they run ----------------------------------------
Failure = tuple[str, str]  # (the field to blame, what is wrong with it)
Check = Callable[[TrainConfig], Iterable[Failure]]


def _rule(name: str, ok: Callable[[TrainConfig], bool], problem: str | Callable[[TrainConfig], str]) -> Check:
    """A check of one field: `problem` (text, or made from the config) when `ok` is false."""
    def check(config: TrainConfig) -> Iterator[Failure]:
        if not ok(config):
            yield name, problem if isinstance(problem, str) else problem(config)
    return check


def _one_of(name: str, choices: tuple[str, ...]) -> Check:
    return _rule(name, lambda c: getattr(c, name) in choices,
                 lambda c: f"must be one of {', '.join(choices)}, got {getattr(c, name)!r}")


def _path_problems(config: TrainConfig) -> Iterator[Failure]:
    for name in PATH_FIELDS:
        value = getattr(config, name)
        for i, path in enumerate(value if isinstance(value, tuple) else (value,)):
            if path and (problem := _path_problem(path)):
                yield (name if not isinstance(value, tuple) else f"{name}[{i}]"), problem


def _validation_prompt_problems(config: TrainConfig) -> Iterator[Failure]:
    for i, prompt in enumerate(config.validation_prompts):
        if prompt.strip() == "":
            yield f"validation_prompts[{i}]", "is empty: give a prompt, or no validation prompts"


def _ident(config: TrainConfig) -> str:
    return config.identifier.strip()


def _is_suffix(ext: str) -> bool:
    return ext == "" or (ext.startswith(".") and len(ext) > 1 and not any(c in ext for c in "/\\ "))


OPTIONAL_TEXT_FIELDS = ("revision", "variant", "pretrained_vae", "class_data_dir", "class_cache_dir",
                        "resume_from_checkpoint")
AT_LEAST_ONE_FIELDS = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "lora_rank",
                       "checkpointing_steps", "validation_steps", "num_validation_images", "sample_batch_size",
                       "class_inference_steps", "validation_inference_steps", "num_class_images", "score_samples",
                       "score_inference_steps")
CHECKS: tuple[Check, ...] = (
    _type_problems,
    _rule("pretrained_model", lambda c: c.pretrained_model.strip() != "", "is required (a Hub id or a local folder)"),
    _rule("instance_data", lambda c: len(c.instance_data) > 0, "is required (a folder or image files)"),
    _rule("output_dir", lambda c: c.output_dir.strip() != "", "is required"),
    *(_rule(name, lambda c, name=name: getattr(c, name) is None or getattr(c, name).strip() != "",
            "must not be empty: leave it out (None) for the default") for name in OPTIONAL_TEXT_FIELDS),
    _path_problems,
    _rule("identifier", lambda c: _ident(c) != "" and " " not in _ident(c),
          lambda c: f"must be one word, got {c.identifier!r}"),
    _rule("instance_prompt", lambda c: c.instance_prompt.strip() != "", "is required"),
    _rule("instance_prompt", lambda c: _ident(c) in c.instance_prompt.split(),
          lambda c: f"must contain the identifier {_ident(c)!r} as a word, got {c.instance_prompt!r}"),
    _validation_prompt_problems,
    _rule("caption_extension", lambda c: _is_suffix(c.caption_extension),
          lambda c: f"must be a file suffix such as '.txt', or empty to ignore caption files, got "
                    f"{c.caption_extension!r}"),
    _rule("class_prompt", lambda c: not c.with_prior_preservation or c.class_prompt.strip() != "",
          "is required with prior preservation"),
    _rule("class_prompt", lambda c: not c.with_prior_preservation or _ident(c) not in c.class_prompt.split(),
          lambda c: f"must not contain the identifier {_ident(c)!r}: it describes the class, not the subject"),
    _one_of("method", METHODS),
    _one_of("preservation", PRESERVATIONS),
    _one_of("mixed_precision", PRECISIONS),
    _one_of("report_to", REPORTERS),
    _one_of("weighting_scheme", WEIGHTING_SCHEMES),
    _one_of("quantize_base", QUANTIZATIONS),
    _rule("quantize_base", lambda c: c.quantize_base == "none" or c.method == "lora",
          lambda c: f"{c.quantize_base} needs method lora: a quantized base model's weights cannot train (QLoRA "
                    "trains a LoRA on them), got method full"),
    _rule("logit_std", lambda c: c.logit_std > 0, lambda c: f"must be > 0, got {c.logit_std}"),
    _rule("guidance", lambda c: 0 <= c.guidance <= MAX_GUIDANCE,
          lambda c: f"must be in [0, {MAX_GUIDANCE:g}] (FLUX.1-dev trains at 1 to 3.5), got {c.guidance}"),
    _rule("max_sequence_length", lambda c: c.max_sequence_length is None or c.max_sequence_length >= 1,
          lambda c: f"must be at least 1, got {c.max_sequence_length}"),
    _one_of("lr_scheduler", LR_SCHEDULERS),
    _rule("resolution", lambda c: c.resolution >= 8 and c.resolution % 8 == 0,
          lambda c: f"must be a positive multiple of 8, got {c.resolution}"),
    _rule("resolution", lambda c: c.resolution <= MAX_RESOLUTION,
          lambda c: f"must be at most {MAX_RESOLUTION}, got {c.resolution}"),
    *(_rule(name, lambda c, name=name: getattr(c, name) >= 1,
            lambda c, name=name: f"must be at least 1, got {getattr(c, name)}") for name in AT_LEAST_ONE_FIELDS),
    _rule("seed", lambda c: 0 <= c.seed <= MAX_SEED, lambda c: f"must be between 0 and {MAX_SEED} (2**32 - 1), got {c.seed}"),
    # AdamW moves each weight by about the learning rate per step: above 1 every weight jumps by more than its
    # own size (and past ~1e37 the optimizer's own float32 arithmetic overflows).
    *(_rule(name, lambda c, lr=lr: 0 < lr(c) <= MAX_LR,
            lambda c, lr=lr: f"must be > 0 and at most {MAX_LR:g} (DreamBooth uses about 1e-6 to 1e-3), got {lr(c)}")
      for name, lr in (("learning_rate", lambda c: c.lr), ("text_encoder_lr", lambda c: c.te_lr))),
    _rule("text_encoder_steps_fraction", lambda c: 0.0 < c.text_encoder_steps_fraction <= 1.0,
          lambda c: f"must be in (0, 1], got {c.text_encoder_steps_fraction}"),
    _rule("lr_warmup_steps", lambda c: c.lr_warmup_steps >= 0, lambda c: f"must be >= 0, got {c.lr_warmup_steps}"),
    *(_rule(name, lambda c, name=name: 0.0 <= getattr(c, name) < 1.0,
            lambda c, name=name: f"must be in [0, 1), got {getattr(c, name)}") for name in ("adam_beta1", "adam_beta2")),
    # 0 would divide 0 by 0 for a weight whose gradient is still 0 (a LoRA matrix at step 1): NaN weights.
    _rule("adam_epsilon", lambda c: c.adam_epsilon > 0, lambda c: f"must be > 0 (1e-8 is usual), got {c.adam_epsilon}"),
    # AdamW shrinks each weight by learning_rate x weight_decay per step: above 1 the decay outruns any lr.
    _rule("adam_weight_decay", lambda c: 0 <= c.adam_weight_decay <= 1,
          lambda c: f"must be in [0, 1] (1e-2 is usual), got {c.adam_weight_decay}"),
    _rule("max_grad_norm", lambda c: c.max_grad_norm > 0, lambda c: f"must be > 0, got {c.max_grad_norm}"),
    _rule("prior_loss_weight", lambda c: 0 <= c.prior_loss_weight <= MAX_PRIOR_LOSS_WEIGHT,
          lambda c: f"must be in [0, {MAX_PRIOR_LOSS_WEIGHT:g}] (1 is usual), got {c.prior_loss_weight}"),
    # Offset noise is a fraction of the noise's own scale (0.1 is usual); past 1 it drowns the noise.
    _rule("offset_noise", lambda c: 0 <= c.offset_noise <= 1,
          lambda c: f"must be in [0, 1] (0.1 is usual), got {c.offset_noise}"),
    _rule("snr_gamma", lambda c: c.snr_gamma is None or c.snr_gamma > 0, lambda c: f"must be > 0, got {c.snr_gamma}"),
    _rule("validation_guidance_scale", lambda c: 0 <= c.validation_guidance_scale <= MAX_GUIDANCE,
          lambda c: f"must be >= 0 (1 turns guidance off) and at most {MAX_GUIDANCE:g}, got "
                    f"{c.validation_guidance_scale}"),
    _rule("lora_alpha", lambda c: c.lora_alpha is None or c.lora_alpha > 0, lambda c: f"must be > 0, got {c.lora_alpha}"),
    _rule("checkpoints_total_limit", lambda c: c.checkpoints_total_limit is None or c.checkpoints_total_limit >= 1,
          lambda c: f"must be at least 1, got {c.checkpoints_total_limit}"),
)


# --- what needs the disk ------------------------------------------------------------------------
def check_locations(config: TrainConfig) -> None:
    """The folders a run will write can be made, and the models it names can be a folder or a Hub
    repo id; said before anything is created (a run folder half made is worse than none)."""
    checks = [(_check_writable_folder, "output_dir")]
    if config.with_prior_preservation and config.class_cache_dir:
        checks.append((_check_writable_folder, "class_cache_dir"))
    checks += [(_check_model_source, name) for name in ("pretrained_model", "pretrained_vae") if getattr(config, name)]
    for check, name in checks:
        try:
            check(getattr(config, name), name)
        except OSError as err:  # a folder that cannot be listed or looked into
            raise ConfigError(f"`{name}`: {err.filename or getattr(config, name)} cannot be read "
                              f"({err.strerror or err})", field=name) from None


def _check_writable_folder(folder: str, name: str) -> None:
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"`{name}`: {path} is a file, not a folder; choose a folder path", field=name)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"`{name}`: {path} cannot be made: {existing} is a file, not a folder", field=name)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"`{name}`: {path} cannot be written: no write permission in {existing}", field=name)


PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _check_model_source(source: str, name: str) -> None:
    """A local diffusers folder with safetensors weights, or else a well-formed Hub repo id (the
    network is asked later, when loading); a missing part is named by the loader."""
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            single = local.suffix.lower() in (".safetensors", ".ckpt")
            raise ConfigError(
                f"`{name}`: {source} is a file; expected a diffusers model folder or a Hub repo id"
                + (" (a single-file checkpoint: convert it once with diffusers' "
                   "`from_single_file(...).save_pretrained(folder)` and train from that folder)" if single else ""),
                field=name,
            )
        _check_model_folder(local, name)
        return
    if local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        return  # a folder that is not there: the model loader names it ("no such folder")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as err:
        raise ConfigError(
            f"`{name}`: {source!r} is neither a local folder nor a Hub repo id such as "
            f"'stable-diffusion-v1-5/stable-diffusion-v1-5' ({str(err).split(':')[0]})",
            field=name,
        ) from None


def _check_model_folder(folder: Path, name: str) -> None:
    """A base model folder is a diffusers pipeline (a VAE folder a model): say what it is instead, or
    which part holds only pickle weights, which are never loaded (unpickling can run any code)."""
    if name == "pretrained_model":
        if not (folder / "model_index.json").is_file():
            inner = sorted(p.parent for p in folder.glob("*/model_index.json"))
            if (folder / "pytorch_lora_weights.safetensors").is_file():
                problem = "is a LoRA (pytorch_lora_weights.safetensors), not a base model: train from its base model"
            elif inner:
                problem = f"has no model_index.json, but {inner[0]} has: did you mean that folder?"
            else:
                problem = ("has no model_index.json: expected a diffusers pipeline folder (model_index.json, unet/, "
                           "vae/, text_encoder/, tokenizer/, scheduler/)")
            raise ConfigError(f"`{name}`: {folder} {problem}", field=name)
        parts = [p for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    else:
        parts = [folder]
    for part in sorted(parts):
        pickles = sorted(p.name for p in part.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(part.glob("*.safetensors")):
            raise ConfigError(
                f"`{name}`: {part} holds only pickle weights ({', '.join(pickles)}), which are never loaded "
                "(unpickling can run any code); use a copy of the model with .safetensors weights, or convert it "
                "once with diffusers' `from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`",
                field=name,
            )
