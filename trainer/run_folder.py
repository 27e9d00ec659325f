"""The run folder: the one place that knows its file names, and reads what a run says about itself.

    <run>/config.json          every setting of the run (TrainConfig), written before training
    <run>/run.json             status, step, total steps, model family (written at each change)
    <run>/metrics.jsonl        one line per step
    <run>/samples/             validation images, step-000400-p0-1.png
    <run>/scored/              what each scored checkpoint drew of the instance prompt, step-000400-0.png
    <run>/checkpoints/         resumable checkpoints (never published)
    <run>/logs/                tracker logs (never published)
    <run>/instance_images/     the app's copy of the uploaded photos
    <run>/model_index.json     a full run: a complete diffusers pipeline
    <run>/pytorch_lora_weights.safetensors   a LoRA run (diffusers)
    <run>/pytorch_lora_weights_kohya.safetensors   the same LoRA as A1111, ComfyUI and kohya load it
    <run>/README.md            the model card
    <run>/.tmp-weights/        the weights while they are saved (output.save_weights moves them in)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer import atomic
from trainer.config import ConfigError, TrainConfig
from trainer.model_files import LORA_WEIGHTS, PIPELINE_INDEX  # diffusers' names, also the run folder's

CONFIG_NAME = "config.json"
STATUS_NAME = "run.json"
METRICS_NAME = "metrics.jsonl"
SAMPLES_DIR = "samples"
SCORED_DIR = "scored"  # not published: the scores' evidence, for the app to show beside its pick
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
INSTANCE_IMAGES_DIR = "instance_images"
KOHYA_LORA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"  # the same LoRA for A1111, ComfyUI, kohya
CARD_NAME = "README.md"
WEIGHTS_STAGING = ".tmp-weights"  # the weights while they are saved; moved into place once complete

RunKind = Literal["full", "lora"]


def run_kind(run_dir: Path) -> RunKind | None:
    """ "full" for a saved pipeline, "lora" for a LoRA file, None while no weights are saved."""
    run_dir = Path(run_dir)
    if (run_dir / PIPELINE_INDEX).is_file():
        return "full"
    if (run_dir / LORA_WEIGHTS).is_file():
        return "lora"
    return None


def is_run(folder: Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def read_config(run_dir: Path) -> TrainConfig:
    """The run's TrainConfig; ConfigError (naming the file) when it is missing or broken."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: it has no {CONFIG_NAME}.")
    return TrainConfig.load(path)


def try_read_config(run_dir: Path) -> TrainConfig | None:
    """The run's TrainConfig, or None for a folder that is not a readable run."""
    try:
        return read_config(run_dir)
    except (ConfigError, OSError, TypeError):
        return None


def write_config(run_dir: Path, config: TrainConfig) -> None:
    with atomic.written(Path(run_dir) / CONFIG_NAME) as tmp:
        config.save(tmp)


def write_status(run_dir: Path, status: str, step: int, total: int, family: str | None = None,
                 processes: int | None = None, weights_step: int | None = None) -> None:
    """run.json, replaced atomically: a reader sees the old or the new file, never half of one.
    `processes` (and the effective batch it makes) is recorded when the run starts and kept after;
    `weights_step`, the step the run's weights are from, when they are saved or exported."""
    record: dict[str, object] = {"status": status, "step": step, "total_steps": total}
    if family is not None:
        record["family"] = family
    before = read_status(run_dir)
    if weights_step is None:
        weights_step = before.get("weights_step")
    if weights_step is not None:
        record["weights_step"] = weights_step
    if processes is None and "processes" in before:
        processes = before["processes"]
    if processes is not None:
        config = try_read_config(run_dir)
        record["processes"] = processes
        if config is not None:
            record["effective_batch"] = processes * config.train_batch_size * config.gradient_accumulation_steps
    with atomic.written(Path(run_dir) / STATUS_NAME) as tmp:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")


def read_status(run_dir: Path) -> dict[str, object]:
    """run.json as a dict ({"status": "unknown"} when there is none or it cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"status": "unknown"}
    return data if isinstance(data, dict) else {"status": "unknown"}


@dataclass(frozen=True)
class RunInfo:
    path: Path
    kind: RunKind | None  # None: no weights saved yet
    status: str

    @property
    def name(self) -> str:
        return self.path.name


def list_runs(runs_dir: Path, *, with_weights: bool = False) -> list[RunInfo]:
    """Run folders (a config.json inside) under `runs_dir`, newest first; `with_weights` keeps
    only those that can generate."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for path in runs_dir.iterdir():
        if not path.is_dir() or not is_run(path):
            continue
        kind = run_kind(path)
        if with_weights and kind is None:
            continue
        found.append((path.stat().st_mtime, RunInfo(path, kind, str(read_status(path).get("status", "unknown")))))
    return [info for _, info in sorted(found, key=lambda item: item[0], reverse=True)]


# Validation samples are saved as step-000400-p0-1.png: step, prompt index, image index.
_SAMPLE_NAME = re.compile(r"^step-(?P<step>\d+)-p(?P<prompt>\d+)-(?P<index>\d+)\.png$")


@dataclass(frozen=True)
class SampleFile:
    path: Path
    step: int  # -1 (and prompt -1) for a PNG in samples/ not named by the engine
    prompt_index: int


def sample_path(run_dir: Path, step: int, prompt_index: int, index: int) -> Path:
    return samples_dir(run_dir) / f"step-{step:06d}-p{prompt_index}-{index}.png"


def list_sample_files(run_dir: Path) -> list[SampleFile]:
    """The PNGs in samples/, by name, with the step and prompt their names say."""
    found = []
    for path in sorted(samples_dir(run_dir).glob("*.png")):
        match = _SAMPLE_NAME.match(path.name)
        found.append(SampleFile(path, int(match["step"]), int(match["prompt"])) if match else SampleFile(path, -1, -1))
    return found


def scored_image_path(run_dir: Path, step: int, index: int) -> Path:
    return Path(run_dir) / SCORED_DIR / f"step-{step:06d}-{index}.png"


def scored_images(run_dir: Path, step: int) -> list[Path]:
    """What the scorer drew of the instance prompt at `step`, the images its subject fidelity was read from."""
    return sorted((Path(run_dir) / SCORED_DIR).glob(f"step-{step:06d}-*.png"))


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_NAME


def samples_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SAMPLES_DIR


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def instance_images_dir(run_dir: Path) -> Path:
    return Path(run_dir) / INSTANCE_IMAGES_DIR


def logs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / LOGS_DIR


# --- what a run (or any model folder) holds, read back -----------------------------------
def lora_base_model(folder: Path) -> tuple[str | None, str | None]:
    """(base model, revision) of a LoRA folder: the card's base_model first, then config.json."""
    folder = Path(folder)
    config: dict = {}
    if (folder / CONFIG_NAME).is_file():
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    revision = config.get("revision")
    if (folder / CARD_NAME).is_file():
        from huggingface_hub import ModelCard

        base = ModelCard.load(folder / CARD_NAME, ignore_metadata_errors=True).data.base_model
        if isinstance(base, list):
            base = base[0] if base else None
        if base:
            return str(base), revision
    return config.get("pretrained_model") or None, revision


def run_family(run_dir: Path, config: TrainConfig | None = None):
    """The model family of a run: as run.json records it, else read from its pipeline or base model."""
    from trainer.families import FAMILIES, ModelLoadError, detect_family, family_by_name

    run_dir = Path(run_dir)
    recorded = read_status(run_dir).get("family")
    if isinstance(recorded, str):
        return family_by_name(recorded)
    if run_kind(run_dir) == "full":
        return detect_family(str(run_dir))  # the run's own pipeline says
    config = config or read_config(run_dir)
    try:
        return detect_family(config.pretrained_model, config.revision)
    except ModelLoadError:
        # A LoRA run from before run.json recorded the family, whose base is out of reach
        # (offline): every such run is Stable Diffusion 1.x/2.x, the only family there was.
        return FAMILIES[0]


def load_pipeline(pipeline: Path | str, dtype, lora_dir: Path | None = None, adapter_name: str | None = None):
    """A pipeline (a folder, or a Hub id: its family read from its model_index.json), plus a LoRA
    folder's weights when given. Safetensors only, no remote code, no safety checker."""
    from trainer.families import family_for_class, read_model_index

    index = read_model_index(str(pipeline))
    pipe = family_for_class(index.get("_class_name"), str(pipeline)).load_pipeline(pipeline, dtype)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS, adapter_name=adapter_name, use_safetensors=True)
    return pipe


def load_run(run_dir: Path, dtype=None, base_model: Path | str | None = None):
    """A trained run folder as a pipeline: its own pipeline, or its base model plus its LoRA file.
    `base_model` overrides the base a LoRA run names (a folder on this machine)."""
    import torch

    run_dir = Path(run_dir)
    dtype = dtype or torch.float32
    kind = run_kind(run_dir)
    if kind == "full":
        return load_pipeline(run_dir, dtype)
    if kind is None:
        raise ConfigError(f"{run_dir} holds no weights yet: neither {PIPELINE_INDEX} nor {LORA_WEIGHTS}.")
    base = base_model or lora_base_model(run_dir)[0]
    if base is None:
        raise ConfigError(f"{run_dir} is a LoRA but names no base model (no base_model in its card or config).")
    return load_pipeline(base, dtype, lora_dir=run_dir)
