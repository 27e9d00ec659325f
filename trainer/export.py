"""A checkpoint's weights as the run's result: `python -m trainer export RUN --checkpoint N|best`.

The checkpoint's trainable tensors go into the base model (LoRA adapters attached as in training), and
the run folder's weights are saved again from them, as the end of training saves them: a pipeline
folder for full fine-tuning, the diffusers and kohya LoRA files for LoRA. run.json then says which step
the weights are from, and the model card carries that step's scores. "best" is the pick of
trainer/scores/pick.py over the run's scores.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from trainer import checkpoints as ckpt
from trainer import run_folder, sharded
from trainer.config import ConfigError, TrainConfig
from trainer.families import ModelFamily
from trainer.scores.measure import read_scores
from trainer.scores.pick import pick_from_rows


@dataclass(frozen=True)
class Exported:
    step: int
    weights: Path
    reason: str  # why this step: the pick's reason, or "asked for"


def choose_step(run_dir: Path, which: str | int) -> tuple[int, str]:
    """The step `which` names ("best", "last" or a step number) among the run's checkpoints."""
    available = ckpt.checkpoint_steps(run_dir)
    have = ", ".join(str(s) for s in sorted(available)) or "none"
    if which == "best":
        pick = pick_from_rows(read_scores(run_dir), available)
        if pick.step is None:
            raise ConfigError(f"`checkpoint`: no best checkpoint in {run_dir}: {pick.reason}", field="checkpoint")
        return pick.step, pick.reason
    if which == "last":
        if not available:
            raise ConfigError(f"`checkpoint`: {run_dir} has no checkpoints", field="checkpoint")
        return max(available), "the last checkpoint"
    try:
        step = int(which)
    except ValueError:
        raise ConfigError(f"`checkpoint`: give a step number, 'best' or 'last', got {which!r}",
                          field="checkpoint") from None
    if step not in available:
        raise ConfigError(f"`checkpoint`: {run_dir} has no checkpoint of step {step} (it has: {have})",
                          field="checkpoint")
    return step, "asked for"


def export_checkpoint(run_dir: Path, which: str | int, replace_current: bool = False) -> Exported:
    """Make checkpoint `which` the run's weights. Refused while the run trains, and when the weights it would
    replace are in no checkpoint (they would be lost) unless `replace_current`."""
    run_dir = Path(run_dir)
    config = run_folder.read_config(run_dir)
    status = run_folder.read_status(run_dir)
    if status.get("status") == "running":
        raise ConfigError(f"{run_dir} is still training: export a checkpoint once it has finished or been cancelled")
    step, reason = choose_step(run_dir, which)
    checkpoint = ckpt.checkpoint_for_step(run_dir, step)
    if sharded.is_sharded_checkpoint(checkpoint):
        raise ConfigError(f"`checkpoint`: {checkpoint.name} was written under DeepSpeed or FSDP (accelerate's sharded "
                          "state), which export does not read yet; resume it in one process and checkpoint again",
                          field="checkpoint")
    if loses_current_weights(run_dir, step) and not replace_current:
        current = status.get("weights_step")
        now = f"step {current}" if current is not None else "an unknown step"
        raise ConfigError(f"The run's weights now (from {now}) are in no checkpoint: exporting step {step} would "
                          "lose them. Pass --replace-current (the app: confirm) to replace them anyway.",
                          field="checkpoint")
    weights = _save_from_checkpoint(config, checkpoint, run_dir)
    run_folder.write_status(run_dir, str(status.get("status", "completed")), int(status.get("step", step)),
                            int(status.get("total_steps", config.max_train_steps)),
                            family=status.get("family"), weights_step=step)
    from trainer.publish.card import write_model_card

    write_model_card(run_dir)
    return Exported(step, weights, reason)


def loses_current_weights(run_dir: Path, step: int) -> bool:
    """Whether making checkpoint `step` the run's weights loses the ones it has now: they are from a step
    that no checkpoint keeps (or from a step run.json does not know)."""
    current = run_folder.read_status(run_dir).get("weights_step")
    return (run_folder.run_kind(run_dir) is not None and current != step
            and current not in ckpt.checkpoint_steps(run_dir))


def _save_from_checkpoint(config: TrainConfig, checkpoint: Path, run_dir: Path) -> Path:
    from trainer.models import load_components, load_trainable_state_dict, mark_trainable
    from trainer.output import save_weights

    parts = load_components(config)
    mark_trainable(parts, config)
    ckpt.load_denoiser(checkpoint, parts.family.denoiser_name, parts.denoiser)
    names = ModelFamily.text_encoder_names(len(parts.trainable_text_encoders))
    for name, text_encoder in zip(names, parts.trainable_text_encoders, strict=True):
        if (checkpoint / f"{name}.safetensors").is_file():
            load_trainable_state_dict(text_encoder, load_file(checkpoint / f"{name}.safetensors"), name)
        elif config.train_text_encoder:
            raise ConfigError(f"{checkpoint} has no {name} weights, but this run trains it", field="checkpoint")
    return save_weights(config, parts, parts.denoiser, parts.text_encoders, run_dir)
