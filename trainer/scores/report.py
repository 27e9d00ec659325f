"""The scores on a model card: the published weights' scores as Hub model-index metrics (which the Hub
shows beside the model and `ModelCard.load(...).data.eval_results` reads back), and a table of every
scored step with the pick and the rule that made it."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

from trainer import checkpoints as ckpt
from trainer.scores.measure import read_scores
from trainer.scores.pick import PickRule, pick_from_rows

# (row key, model-index metric type, what the Hub shows)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("subject", "subject-fidelity", "Subject fidelity (image-embedding similarity to the photos)"),
    ("subject_clip", "subject-fidelity-clip-i", "Subject fidelity, CLIP-I"),
    ("prompt", "prompt-fidelity", "Prompt fidelity (text-image similarity on new contexts)"),
    ("subject_in_context", "subject-fidelity-in-context", "Subject fidelity in the new contexts"),
    ("drift", "class-drift", "Class drift (share of class samples now drawn as the subject)"),
    ("div_kept", "class-diversity-kept", "Class diversity kept (fraction of the base model's)"),
    ("memorisation", "memorisation", "Memorisation (highest similarity of a sample to a training photo)"),
)


def eval_results(row: dict, dataset_name: str) -> list[EvalResult]:
    """One row of scores.jsonl as model-index metrics; the embedders that scored it are the metric config."""
    return [EvalResult(task_type="text-to-image", dataset_type="dreambooth-subject-photos", dataset_name=dataset_name,
                       metric_type=metric, metric_value=float(row[key]), metric_name=name,
                       metric_config=str(row.get("scored_with", "")) or None)
            for key, metric, name in METRICS if row.get(key) is not None]


def card_metrics(card: ModelCard) -> dict[str, float]:
    """The metrics a card carries, by metric type (what `eval_results` wrote)."""
    return {result.metric_type: float(result.metric_value) for result in card.data.eval_results or []}


def published_row(run_dir: Path, weights_step: int | None) -> tuple[dict | None, list[dict]]:
    """The scores of the weights the run folder holds (None when that step was not scored) and all rows."""
    rows = read_scores(run_dir)
    row = next((r for r in rows if weights_step is not None and r["step"] == weights_step and not r.get("base")), None)
    return row, rows


def scores_section(run_dir: Path, weights_step: int | None, rows: list[dict]) -> list[str]:
    """Markdown lines: each scored step, the pick, the rule; [] when the run was not scored."""
    if not rows:
        return []
    rule = PickRule()
    pick = pick_from_rows(rows, ckpt.checkpoint_steps(run_dir), rule)
    lines = ["## Scores", "",
             f"Scored at every checkpoint on fixed seeds ({rows[0].get('scored_with', 'unknown embedders')}); "
             "the base model is step 0.", "",
             "| Step | Subject fidelity | Prompt fidelity | Subject in new contexts | Class drift | Class diversity kept "
             "| Memorisation |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        marks = [m for m, on in (("base model", row.get("base")), ("these weights", row["step"] == weights_step),
                                 ("picked", row["step"] == pick.step)) if on]
        step = f"{row['step']}" + (f" ({', '.join(marks)})" if marks else "")
        kept = "" if row.get("div_kept") is None else f"{row['div_kept']:.2f}"
        context = "" if row.get("subject_in_context") is None else f"{row['subject_in_context']:.3f}"
        copy = " (copy?)" if row.get("memorised") and not row.get("base") else ""
        lines.append(f"| {step} | {row['subject']:.3f} | {row['prompt']:.3f} | {context} | {row['drift']:.0%} | {kept} | "
                     f"{row['memorisation']:.3f}{copy} |")
    lines += ["", f"The pick rule: {rule.describe()}. "
                  + (f"Picked: {pick.reason}." if pick.step is not None else f"{pick.reason}"), ""]
    return lines
