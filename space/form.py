"""The Train form: one table of its fields, and the one place where its values become a TrainConfig.

Each row of FORM names a form key (the /train API's parameter name), the gradio component that
shows it, where the layout puts it, how its value parses, and the TrainConfig field it sets (None
when the UI reads it by hand or only the UI uses it). A new engine option is one row. The concept
presets and the prompt helpers live here too.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import gradio as gr

from space import texts
from space.presets import FAMILY_PRESETS, SD
from trainer.config import PRECISIONS, ConfigError, TrainConfig, check_locations
from trainer.data.photos import MAX_PHOTOS, MIN_PHOTOS, is_caption_file

MIN_IMAGES, MAX_IMAGES = MIN_PHOTOS, MAX_PHOTOS  # the engine's own range
DEFAULT_IDENTIFIER = "zwx"  # a made-up word; the popular "sks" is also the name of a rifle
DEFAULT_CLASS_NOUN = "dog"
MAX_IDENTIFIER = 64  # characters; the run folder's name holds it
SCORED_CHECKPOINTS = 4  # a scored run's checkpoints: a curve of four points besides the base model's, and a pick


class Concept(StrEnum):
    OBJECT = "object"
    PERSON = "person"
    STYLE = "style"


@dataclass(frozen=True)
class Preset:
    steps_per_image: int
    text_encoder_fraction: float


# multimodalart's "Dreambooth Training" Space (see shared/REFERENCE.md): 200 steps per image;
# faces need the text encoder longest, styles barely (it would drift the whole vocabulary).
PRESETS: dict[Concept, Preset] = {
    Concept.OBJECT: Preset(200, 0.30),
    Concept.PERSON: Preset(200, 0.65),
    Concept.STYLE: Preset(200, 0.15),
}


def preset_values(concept: str, num_images: int, method: str, family: str = SD) -> dict[str, Any]:
    """Steps, learning rate and text-encoder training a concept type implies, at the learning rate
    of the base model's family (space.presets.FAMILY_PRESETS) for the method."""
    preset = PRESETS[Concept(concept)]
    rates = FAMILY_PRESETS.get(family, FAMILY_PRESETS[SD]).learning_rate
    return {
        "max_train_steps": preset.steps_per_image * max(num_images, 1),
        "learning_rate": rates.get(method, rates["lora"]),
        "train_text_encoder": True,
        "text_encoder_steps_fraction": preset.text_encoder_fraction,
    }


def checkpoint_every(steps: int) -> int:
    """The checkpoint interval of a scored run of `steps` steps: SCORED_CHECKPOINTS checkpoints, each scored."""
    return max(1, math.ceil(steps / SCORED_CHECKPOINTS))


def prompts_for(identifier: str, class_noun: str, concept: str) -> tuple[str, str]:
    """(instance prompt, class prompt) in the paper's "a [V] [class noun]" / "a [class noun]" form."""
    ident, noun = identifier.strip(), class_noun.strip()
    if Concept(concept) is Concept.STYLE:
        noun = noun or "painting"
        return f"{with_article(noun)} in the style of {ident}", with_article(noun)
    return (f"a photo of {ident} {noun}".rstrip(), f"a photo of {with_article(noun)}" if noun else "")


_AN_EXCEPTIONS = ("uni", "use", "usu", "uti", "eu", "one", "once", "ur")  # a unicorn, a user, a euro, a one-eyed cat
_AN_SILENT_H = ("hour", "honest", "honor", "honour", "heir")  # an hour


def with_article(noun: str) -> str:
    """ "a dog", "an owl", "a unicorn", "an hour": the article by the noun's first sound, guessed from its
    spelling; a noun that comes with its article ("the Eiffel tower") is left as it is."""
    word = noun.strip()
    lower = word.lower()
    if not word or lower.startswith(("a ", "an ", "the ")):
        return word
    vowel = lower[0] in "aeiou" and not lower.startswith(_AN_EXCEPTIONS)
    return f"{'an' if vowel or lower.startswith(_AN_SILENT_H) else 'a'} {word}"


def new_run_dir(runs_dir: Path, identifier: str) -> Path:
    """A fresh folder name: sortable by time, readable by subject, never an existing run."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", identifier.strip()).strip("-")[:MAX_IDENTIFIER].strip("-") or "run"
    base = Path(runs_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _image_paths(value: Any) -> tuple[str, ...]:
    """gr.File(file_count="multiple") gives paths; gradio_client may send FileData dicts."""
    items = value or []
    paths = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("path") or item.get("name")
        paths.append(str(getattr(item, "name", item)))
    return tuple(paths)


def photos_only(paths: Sequence[str]) -> list[str]:
    """The uploads without their caption files (dog1.txt beside dog1.jpg is that photo's prompt)."""
    return [p for p in paths if not is_caption_file(p, TrainConfig.caption_extension)]


# --- the table ------------------------------------------------------------------------------
Kind = Literal["files", "text", "choice", "flag", "int", "float"]


@dataclass(frozen=True)
class FormField:
    key: str  # the form's key, which is also the /train API's parameter name
    widget: Callable[..., gr.components.Component]  # gr.Textbox, gr.Slider, …: called with value= and props
    place: str  # the layout group that holds it (train_tab draws the groups)
    kind: Kind  # how form_to_config parses its value
    config: str | None = None  # the TrainConfig field it sets; None: read by hand, or by the UI only
    props: Mapping[str, Any] = field(default_factory=dict)  # label, info, ranges, elem_id
    optional: bool = False  # left empty: the base model's setting, else TrainConfig's default

    def parse(self, values: Mapping[str, Any]) -> Any:
        """The value for TrainConfig; None for an optional field left empty."""
        raw = values.get(self.key)
        if self.optional and (raw is None or raw == ""):
            return None
        if self.kind == "files":
            return _image_paths(raw)
        if self.kind == "flag":
            if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
                return raw.strip().lower() == "true"
            if raw is None or (isinstance(raw, bool | int) and raw in (0, 1)):
                return bool(raw)
            raise ConfigError(f"`{self.key}` must be true or false, got {raw!r}", field=self.key)
        if self.kind in ("int", "float"):
            return _number(values, self.key, int if self.kind == "int" else float)
        if self.kind == "choice" and self.config:
            return str(raw or getattr(TrainConfig(), self.config))
        return str(raw or "").strip()


def _row(
    key: str, widget: Any, place: str, kind: Kind, config: str | None = None, optional: bool = False, **props: Any
) -> FormField:
    return FormField(key, widget, place, kind, config, props, optional)


# Rows in the /train endpoint's parameter order; train_tab draws each place's rows in this order.
# fmt: off
FORM: tuple[FormField, ...] = (
    #    key                            widget       place           kind     TrainConfig field
    _row("images",                      gr.File,     "photos",       "files", "instance_data",
         label="Instance photos", file_count="multiple", file_types=["image", ".txt"], elem_id="train-images"),
    _row("identifier",                  gr.Textbox,  "names",        "text",  "identifier",
         label="Identifier", info=texts.IDENTIFIER_HELP),
    _row("class_noun",                  gr.Textbox,  "names",        "text",  "class_noun",
         label="Class noun", info=texts.CLASS_NOUN_HELP),
    _row("concept",                     gr.Radio,    "concept",      "text",  None,
         choices=[c.value for c in Concept], label="Concept type", info=texts.CONCEPT_HELP),
    _row("instance_prompt",             gr.Textbox,  "prompts",      "text",  "instance_prompt",
         label="Instance prompt", info=texts.INSTANCE_PROMPT_HELP),
    _row("class_prompt",                gr.Textbox,  "prompts",      "text",  "class_prompt",
         label="Class prompt", info=texts.CLASS_PROMPT_HELP, elem_id="class-prompt"),
    _row("method",                      gr.Radio,    "prompts",      "choice", "method",
         choices=[("LoRA", "lora"), ("Full fine-tune", "full")], label="Method", info=texts.METHOD_HELP),
    _row("base_model",                  gr.Dropdown, "prompts",      "text",  "pretrained_model",  # choices: the machine's
         allow_custom_value=True, label="Base model", info=texts.BASE_MODEL_HELP, elem_id="base-model"),
    _row("with_prior_preservation",     gr.Checkbox, "prior",        "flag",  "with_prior_preservation",
         label="Prior preservation", info=texts.PRIOR_HELP),
    _row("num_class_images",            gr.Slider,   "prior",        "int",   "num_class_images",
         minimum=1, maximum=1000, step=1, label="Class images"),
    _row("max_train_steps",             gr.Number,   "steps",        "int",   "max_train_steps",
         precision=0, label="Training steps", elem_id="steps"),
    _row("learning_rate",               gr.Number,   "steps",        "float", "learning_rate",
         label="Learning rate"),
    _row("train_batch_size",            gr.Slider,   "steps",        "int",   "train_batch_size",
         minimum=1, maximum=8, step=1, label="Batch size"),
    _row("gradient_accumulation_steps", gr.Slider,   "steps",        "int",   "gradient_accumulation_steps",
         minimum=1, maximum=16, step=1, label="Gradient accumulation"),
    _row("train_text_encoder",          gr.Checkbox, "text encoder", "flag",  "train_text_encoder",
         label="Train the text encoder"),
    _row("text_encoder_steps_fraction", gr.Slider,   "text encoder", "float", "text_encoder_steps_fraction",
         minimum=0.05, maximum=1.0, step=0.05, label="…for this fraction of the steps"),
    _row("resolution",                  gr.Number,   "text encoder", "int",   "resolution",
         precision=0, step=8, label="Resolution", elem_id="resolution"),
    _row("use_8bit_adam",               gr.Checkbox, "memory",       "flag",  "use_8bit_adam",
         label="8-bit Adam"),
    _row("gradient_checkpointing",      gr.Checkbox, "memory",       "flag",  "gradient_checkpointing",
         label="Gradient checkpointing"),
    _row("mixed_precision",             gr.Radio,    "memory",       "choice", "mixed_precision",
         choices=list(PRECISIONS), label="Mixed precision"),
    _row("seed",                        gr.Number,   "memory",       "int",   "seed",
         precision=0, label="Seed"),
    _row("checkpointing_steps",         gr.Number,   "outputs",      "int",   "checkpointing_steps",
         precision=0, label="Checkpoint every N steps"),
    _row("validation_prompt",           gr.Textbox,  "outputs",      "text",  None,  # -> validation_prompts
         label="Validation prompt", info=texts.VALIDATION_HELP),
    _row("validation_steps",            gr.Number,   "outputs",      "int",   "validation_steps",
         precision=0, label="Sample every N steps", elem_id="validation-steps"),
    # Added after the rest, so that the /train endpoint's earlier parameters keep their positions.
    _row("lora_rank",                   gr.Number,   "steps",        "int",   "lora_rank", optional=True,
         precision=0, minimum=1, label="LoRA rank", info=texts.LORA_RANK_HELP, elem_id="lora-rank"),
    _row("cache_latents",               gr.Checkbox, "memory",       "flag",  "cache_latents", optional=True,
         label="Cache latents", info=texts.CACHE_LATENTS_HELP),
    _row("sample_batch_size",           gr.Number,   "prior",        "int",   "sample_batch_size", optional=True,
         precision=0, minimum=1, label="Class images per batch", info=texts.SAMPLE_BATCH_HELP,
         elem_id="sample-batch-size"),
    _row("preservation",                gr.Radio,    "prior",        "choice", "preservation", optional=True,
         choices=[("Class images", "class-images"), ("The base model's predictions", "base-prediction")],
         label="Preserve the class with", info=texts.PRESERVATION_HELP, elem_id="preservation"),
    _row("score_checkpoints",           gr.Checkbox, "outputs",      "flag",  "score_checkpoints", optional=True,
         label="Score each checkpoint", elem_id="score-checkpoints",
         info=texts.score_checkpoints_help(TrainConfig.score_samples, SCORED_CHECKPOINTS)),
    _row("quantize_base",               gr.Radio,    "memory",       "choice", "quantize_base", optional=True,
         choices=[("None", "none"), ("4-bit NF4", "nf4"), ("8-bit", "int8")], label="Quantize the base model",
         info=texts.QUANTIZE_HELP, elem_id="quantize-base"),
)
# fmt: on
FIELDS: dict[str, FormField] = {f.key: f for f in FORM}
_NOT_HIDDEN = frozenset({"output_dir", "validation_prompts"})  # form_to_config's own


def config_to_form(config: TrainConfig) -> dict[str, Any]:
    """The form's values for the fields that map to `config` (the rest are the caller's)."""
    return {f.key: getattr(config, f.config) for f in FORM if f.config}


def initial_values(machine: Mapping[str, Any], family: str = SD) -> dict[str, Any]:
    """The form as a page first shows it: TrainConfig's defaults, then the settings that fit the
    machine (space.hardware_fit.safe_defaults), the object preset at the learning rate of the base
    model's `family`, the prompts of "zwx dog", and scores at every checkpoint."""
    values = config_to_form(TrainConfig())
    instance_prompt, class_prompt = prompts_for(DEFAULT_IDENTIFIER, DEFAULT_CLASS_NOUN, Concept.OBJECT.value)
    values.update(
        images=None,
        identifier=DEFAULT_IDENTIFIER,
        class_noun=DEFAULT_CLASS_NOUN,
        concept=Concept.OBJECT.value,
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        validation_prompt="",
        **machine,
    )
    values.update(preset_values(Concept.OBJECT.value, 0, values["method"], family))
    # The app scores by default (the run then says which checkpoint is best), so checkpoints follow the steps.
    values.update(score_checkpoints=True, checkpointing_steps=checkpoint_every(values["max_train_steps"]))
    # The preset trains the text encoder; where the settings picked for this GPU do not (it would not
    # fit), the machine's choice wins.
    values["train_text_encoder"] = values["train_text_encoder"] and machine.get("train_text_encoder", True)
    return values


# --- values → TrainConfig ---------------------------------------------------------------------
def _number(values: Mapping[str, Any], field: str, kind: type) -> Any:
    """A number box's value (gradio sends int, float or str; an API client anything) as `kind`."""
    raw = values.get(field)
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        raise ConfigError(f"`{field}` is required", field=field)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ConfigError(f"`{field}` must be a number, got {raw!r}", field=field)
    if isinstance(raw, int):
        number: int | float = raw
    else:
        try:  # "12" stays an exact int; "1e3", "2.5" go through float
            number = int(raw) if kind is int and isinstance(raw, str) and raw.strip().lstrip("+-").isdigit() else float(raw)
        except ValueError:
            raise ConfigError(f"`{field}` must be a number, got {raw!r}", field=field) from None
    if not math.isfinite(number):
        raise ConfigError(f"`{field}` must be a finite number, got {raw!r}", field=field)
    if kind is int:
        if number != int(number):
            raise ConfigError(f"`{field}` must be a whole number, got {raw!r}", field=field)
        return int(number)
    return float(number)


def _no_settings(base_model: str) -> Mapping[str, Any]:
    return {}


def form_to_config(
    values: Mapping[str, Any],
    runs_dir: Path,
    resolve_model: Callable[[str], str] = str.strip,
    model_settings: Callable[[str], Mapping[str, Any]] = _no_settings,
) -> TrainConfig:
    """Map the Train form (keys as in FORM) to a validated TrainConfig.

    Raises ConfigError with the engine's own words; `resolve_model` turns the toy entry of the
    model list into its folder (and is only called once everything else is valid).
    `model_settings` gives the engine settings a base model wants that the form does not show
    (the toy model's LoRA rank and sampler steps); the form's own fields always win.
    """
    images = FIELDS["images"].parse(values)  # photos, and any caption .txt files uploaded with them
    n_photos = len(photos_only(images))
    if not MIN_IMAGES <= n_photos <= MAX_IMAGES:
        raise ConfigError(f"`instance_data` needs {MIN_IMAGES} to {MAX_IMAGES} images, got {n_photos}")
    settings = {f.config: value for f in FORM if f.config and (value := f.parse(values)) is not None}
    if len(str(settings.get("identifier", ""))) > MAX_IDENTIFIER:  # a rare token is a few letters
        raise ConfigError(f"`Identifier` (identifier) must be at most {MAX_IDENTIFIER} characters, got "
                          f"{len(settings['identifier'])}", field="identifier")
    # A base model's hidden settings fill only what the form leaves unset: its fields always win.
    hidden = {
        k: v
        for k, v in model_settings(settings["pretrained_model"]).items()
        if k not in settings and k not in _NOT_HIDDEN
    }
    config = TrainConfig(
        **settings,
        output_dir=str(new_run_dir(runs_dir, settings["identifier"])),
        validation_prompts=(FIELDS["validation_prompt"].parse(values) or settings["instance_prompt"],),
        **hidden,
    ).validate()
    config = config.replace(pretrained_model=resolve_model(config.pretrained_model))
    check_locations(config)  # the base model and the run folder, before the job copies the uploads there
    return config
