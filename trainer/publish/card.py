"""The model card (README.md) of a run folder: Hub metadata, a usage snippet, settings, samples.

The card describes the run from what is in the folder, so it is correct whoever calls it: the
engine at the end of training (no repo yet: the snippet loads the folder itself) and `publish`
just before upload (the snippet loads the real repo id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from trainer.config import TrainConfig
from trainer.run_folder import (
    CARD_NAME,
    KOHYA_LORA_WEIGHTS,
    LORA_WEIGHTS,
    SAMPLES_DIR,
    list_sample_files,
    read_config,
    read_status,
    run_family,
    run_kind,
)

MAX_CARD_SAMPLES = 8

class License(NamedTuple):
    """A model card's license: a Hub license id, or "other" with the license's name and link."""

    id: str
    name: str | None = None
    link: str | None = None

    def card_fields(self) -> dict[str, str]:
        fields = {"license": self.id, "license_name": self.name, "license_link": self.link}
        return {key: value for key, value in fields.items() if value}


# Licenses of well-known bases, for when the base's own card is not at hand (offline training): the Hub's
# metadata, `license: other` with the license's name and link where it is none of the Hub's own.
_FLUX_DEV = License("other", "flux-1-dev-non-commercial-license",
                    "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md")
_SD35 = License("other", "stabilityai-ai-community",
                "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md")
_KNOWN_LICENSES: tuple[tuple[str, License], ...] = (  # (fnmatch pattern of the Hub id, license)
    ("runwayml/stable-diffusion-v1-5", License("creativeml-openrail-m")),
    ("stable-diffusion-v1-5/*", License("creativeml-openrail-m")),
    ("CompVis/*", License("creativeml-openrail-m")),
    ("stabilityai/stable-diffusion-2*", License("openrail++")),
    ("stabilityai/stable-diffusion-3*", _SD35),
    ("black-forest-labs/FLUX.1-dev", _FLUX_DEV),
    ("black-forest-labs/FLUX.1-schnell", License("apache-2.0")),
)
# A local folder inside the Hugging Face cache still knows which Hub repo it came from.
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\]")


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the run folder, with forward slashes (as in the repo)
    prompt: str
    step: int


def list_samples(run_dir: Path, config: TrainConfig) -> list[Sample]:
    """The validation samples of the last step that has any, prompt by prompt."""
    prompts = config.validation_prompts
    parsed = [
        Sample(f"{SAMPLES_DIR}/{f.path.name}",
               prompts[f.prompt_index] if 0 <= f.prompt_index < len(prompts) else config.instance_prompt, f.step)
        for f in list_sample_files(run_dir)
    ]
    if not parsed:
        return []
    last = max(sample.step for sample in parsed)
    return [sample for sample in parsed if sample.step == last][:MAX_CARD_SAMPLES]


def hub_base_model(pretrained_model: str) -> str | None:
    """The Hub id of the base model, or None when it is a local folder of unknown origin."""
    match = _CACHE_SNAPSHOT.search(pretrained_model)
    if match:
        return f"{match['org']}/{match['name']}"
    if Path(pretrained_model).expanduser().exists():
        return None
    try:
        validate_repo_id(pretrained_model)
    except HFValidationError:
        return None
    return pretrained_model if "/" in pretrained_model else None


def base_license(pretrained_model: str) -> License | None:
    """The base model's license: from its own card when it is on disk, else from the known list."""
    local = Path(pretrained_model).expanduser()
    if (local / CARD_NAME).is_file():
        data = ModelCard.load(local / CARD_NAME, ignore_metadata_errors=True).data
        if data.license:
            return License(str(data.license), data.get("license_name"), data.get("license_link"))
    hub_id = hub_base_model(pretrained_model)
    if hub_id is None:
        return None
    return next((license_ for pattern, license_ in _KNOWN_LICENSES if fnmatchcase(hub_id, pattern)), None)


def build_model_card(run_dir: Path, repo_id: str | None = None) -> ModelCard:
    """The card of `run_dir`; `repo_id` None makes the usage snippet load the folder itself. When the run was
    scored, the scores of the weights it holds (run.json's weights_step) are its model-index metrics."""
    from trainer.scores.report import eval_results, published_row, scores_section  # torch: only when a card is made

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights_step = read_status(run_dir).get("weights_step")
    scored, rows = published_row(run_dir, weights_step)
    kind = run_kind(run_dir) or config.method
    family = run_family(run_dir, config)
    samples = list_samples(run_dir, config)
    base_id = hub_base_model(config.pretrained_model)

    tags = ["text-to-image", "diffusers", "dreambooth", *family.card_tags, "diffusers-training"]
    if kind == "lora":
        tags.append("lora")
    license_ = base_license(config.pretrained_model)
    data = ModelCardData(
        base_model=base_id,
        **(license_.card_fields() if license_ else {}),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        instance_prompt=config.instance_prompt,
        widget=[{"text": s.prompt, "output": {"url": s.path}} for s in samples] or None,
        model_name=(repo_id or run_dir.name) if scored else None,
        eval_results=eval_results(scored, f"{config.identifier} {config.class_noun} photos") if scored else None,
    )
    where = repo_id or str(run_dir.resolve())
    body = "\n".join(
        [
            f"# DreamBooth {'LoRA' if kind == 'lora' else 'fine-tune'}: `{config.identifier}`",
            "",
            _describe(kind, config, base_id, family.label),
            f"It was trained with DreamBooth on a few photos of one subject, named by the identifier "
            f"`{config.identifier}`. Prompt with the instance prompt",
            f"**`{config.instance_prompt}`**, or any prompt that uses `{config.identifier}` the same way.",
            "",
            "## Use it",
            "",
            "```python",
            _usage(kind, where, base_id or config.pretrained_model, config, family),
            "```",
            "",
            *(_kohya_note(run_dir) if kind == "lora" else []),
            "## Samples",
            "",
            _gallery(samples),
            "",
            *scores_section(run_dir, weights_step, rows),
            "## Training settings",
            "",
            _settings_table(kind, config),
            "",
            "Trained with DreamBooth Studio; `config.json` in this repo holds every setting of the run.",
            "",
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(run_dir: Path, repo_id: str | None = None) -> Path:
    """Write `run_dir/README.md` (see build_model_card) and return its path."""
    path = Path(run_dir) / CARD_NAME
    build_model_card(run_dir, repo_id).save(path)
    return path


def _describe(kind: str, config: TrainConfig, base_id: str | None, family_label: str) -> str:
    base = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{config.pretrained_model}`"
    if kind == "lora":
        return f"LoRA weights (rank {config.lora_rank}) for {base}."
    return f"A full {family_label} pipeline fine-tuned from {base}."


def _usage(kind: str, where: str, base: str, config: TrainConfig, family) -> str:
    prompt = config.instance_prompt.replace('"', '\\"')
    pipeline, sampling = family.pipeline_class.__name__, family.sampling_defaults
    dtype = f"torch.{sampling['dtype']}"
    lines = ["import torch", f"from diffusers import {pipeline}", ""]
    if kind == "lora":
        revision = f', revision="{config.revision}"' if config.revision else ""
        lines += [
            f"pipe = {pipeline}.from_pretrained(",
            f'    "{base}"{revision}, dtype={dtype}, use_safetensors=True',
            ').to("cuda")',
            f'pipe.load_lora_weights("{where}", weight_name="{LORA_WEIGHTS}")',
        ]
    else:
        lines += [
            f"pipe = {pipeline}.from_pretrained(",
            f'    "{where}", dtype={dtype}, use_safetensors=True',
            ').to("cuda")',
        ]
    lines += [
        f'image = pipe("{prompt}", num_inference_steps={sampling["steps"]}, '
        f'guidance_scale={sampling["guidance_scale"]}).images[0]',
        f'image.save("{config.identifier}.png")',
    ]
    return "\n".join(lines)


def _kohya_note(run_dir: Path) -> list[str]:
    if not (run_dir / KOHYA_LORA_WEIGHTS).is_file():
        return []
    return [
        f"The same LoRA for AUTOMATIC1111, ComfyUI and kohya's tools: `{KOHYA_LORA_WEIGHTS}` (kohya layout; "
        "put it in the `models/Lora` folder).",
        "",
    ]


def _gallery(samples: list[Sample]) -> str:
    if not samples:
        return "No validation samples were saved during training."
    step = samples[0].step
    head = f"Validation samples at step {step}:" if step >= 0 else "Validation samples:"
    images = "\n".join(f"![{_cell(s.prompt)}]({s.path})" for s in samples)
    return f"{head}\n\n{images}"


def _settings_table(kind: str, config: TrainConfig) -> str:
    method = "full fine-tuning of the UNet"
    if kind == "lora":
        method = f"LoRA, rank {config.lora_rank}, alpha {config.lora_alpha or config.lora_rank}"
    prior = "no"
    if config.class_images_used:
        prior = (
            f"yes: `{config.class_prompt}`, {config.num_class_images} class images, "
            f"weight {config.prior_loss_weight}"
        )
    elif config.from_base_prediction:
        prior = f"yes: `{config.class_prompt}`, from the base model's predictions, weight {config.prior_loss_weight}"
    text_encoder = "no"
    if config.train_text_encoder:
        text_encoder = f"yes, for {config.text_encoder_steps_fraction:.0%} of the steps"
    base = f"`{config.pretrained_model}`" + (f" @ `{config.revision}`" if config.revision else "")
    rows = [
        ("Base model", base),
        ("Method", method),
        ("Text encoder trained", text_encoder),
        ("Instance prompt", f"`{config.instance_prompt}`"),
        ("Prior preservation", prior),
        ("Steps", str(config.max_train_steps)),
        ("Learning rate", f"{config.lr:g} ({config.lr_scheduler}, {config.lr_warmup_steps} warm-up steps)"),
        ("Batch size", f"{config.train_batch_size} x {config.gradient_accumulation_steps} accumulation"),
        ("Resolution", f"{config.resolution} px"),
        ("Mixed precision", config.mixed_precision),
        ("Optimizer", "AdamW 8-bit" if config.use_8bit_adam else "AdamW"),
        ("Min-SNR gamma", "off" if config.snr_gamma is None else f"{config.snr_gamma:g}"),
        ("Offset noise", f"{config.offset_noise:g}"),
        ("Seed", str(config.seed)),
    ]
    return "\n".join(["| Setting | Value |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)])


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell or image alt text."""
    return text.replace("|", "\\|").replace("[", "(").replace("]", ")").replace("\n", " ")
