"""Which checkpoint to keep: the rule, applied to the scores of each checkpoint.

DreamBooth overfits with steps: the subject gets closer to the photos while new prompts stop
working (the photos' backgrounds creep in) and the class drifts towards the subject. The rule keeps
the checkpoint that draws the subject best among those that still do what a prompt says and still
know the class:

1. eligible: prompt fidelity at least the base model's minus `prompt_margin`, or minus twice the
   sampling noise of the difference when that is larger (with a few samples per prompt, two scores of
   the same model differ by more than a fixed margin), and drift (the share of class-prompt samples
   that now look like the subject) at most `max_drift`;
2. among them, the highest subject fidelity; a tie goes to the earlier step (fewer steps, less
   overfitting, and the same result twice gives the same pick);
3. when none is eligible, no pick: the run's result stays its last weights, and the reason says
   which condition failed everywhere and what to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointScores:
    """The scores of one checkpoint (or of the base model, at step 0)."""

    step: int
    subject: float  # subject fidelity: similarity of "a photo of <id> <class>" samples to the photos
    prompt: float  # prompt fidelity: text-image similarity on recontextualisation prompts
    drift: float  # share of class-prompt samples that look like the subject, 0..1
    prompt_se: float = 0.0  # the standard error of `prompt` (sampling noise)


@dataclass(frozen=True)
class PickRule:
    prompt_margin: float = 0.02
    max_drift: float = 0.25

    def describe(self) -> str:
        return (f"the highest subject fidelity among checkpoints whose prompt fidelity is within "
                f"{self.prompt_margin:g} of the base model's (or twice the sampling noise, when larger) and whose "
                f"class drift is at most {self.max_drift:.0%}; ties go to the earlier step")

    def margin(self, scores: CheckpointScores, base_se: float) -> float:
        return max(self.prompt_margin, 2 * math.hypot(scores.prompt_se, base_se))

    def keeps_prompts(self, scores: CheckpointScores, base_prompt: float, base_se: float = 0.0) -> bool:
        return scores.prompt >= base_prompt - self.margin(scores, base_se)

    def keeps_class(self, scores: CheckpointScores) -> bool:
        return scores.drift <= self.max_drift


@dataclass(frozen=True)
class Pick:
    step: int | None  # None: no checkpoint passed
    reason: str


def pick_best(checkpoints: Sequence[CheckpointScores], base_prompt: float, rule: PickRule = PickRule(),
              base_se: float = 0.0) -> Pick:
    """The checkpoint `rule` keeps, given each checkpoint's scores and the base model's prompt fidelity
    (and its standard error)."""
    if not checkpoints:
        return Pick(None, "no checkpoint was scored")
    eligible = [s for s in checkpoints if rule.keeps_prompts(s, base_prompt, base_se) and rule.keeps_class(s)]
    if eligible:
        best = max(eligible, key=lambda s: (s.subject, -s.step))
        return Pick(best.step, f"step {best.step}: subject fidelity {best.subject:.3f}, prompt fidelity "
                               f"{best.prompt:.3f} (base {base_prompt:.3f}), drift {best.drift:.0%}; "
                               f"{len(eligible)} of {len(checkpoints)} checkpoints eligible")
    failed = []
    if not any(rule.keeps_prompts(s, base_prompt, base_se) for s in checkpoints):
        failed.append(f"prompt fidelity fell more than {rule.prompt_margin:g} (or its noise) below the base model's "
                      f"{base_prompt:.3f} at every checkpoint (the photos' backgrounds leak into new prompts: "
                      "fewer steps, a lower learning rate, or captions naming the backgrounds)")
    if not any(rule.keeps_class(s) for s in checkpoints):
        failed.append(f"the class drifted past {rule.max_drift:.0%} at every checkpoint (turn prior "
                      "preservation on, or raise its weight)")
    if not failed:  # each condition held somewhere, never both at once
        failed.append("no checkpoint kept both prompt fidelity and the class at once (fewer steps, or a "
                      "checkpoint every fewer steps)")
    return Pick(None, "no checkpoint passed: " + "; ".join(failed) + ". The run's last weights stay its result.")


def pick_from_rows(rows: Sequence[dict], available: set[int] | None = None, rule: PickRule = PickRule()) -> Pick:
    """The pick over the rows of a run's scores.jsonl (trainer/scores.py): the base row gives the base
    model's prompt fidelity; `available` limits it to the checkpoints still on disk."""
    base = next((row for row in rows if row.get("base")), None)
    if base is None:
        return Pick(None, "the base model was not scored, so there is nothing to compare with")
    checkpoints = [CheckpointScores(int(row["step"]), float(row["subject"]), float(row["prompt"]), float(row["drift"]),
                                    float(row.get("prompt_se", 0.0)))
                   for row in rows if not row.get("base") and (available is None or row["step"] in available)]
    return pick_best(checkpoints, float(base["prompt"]), rule, float(base.get("prompt_se", 0.0)))
