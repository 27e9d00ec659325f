"""Which checkpoint to keep: the rule, applied to the scores of each checkpoint.

DreamBooth overfits with steps: the subject gets closer to the photos while new prompts stop
working (the photos' backgrounds creep in) and the class drifts towards the subject. The last
checkpoint is rarely the best one, and the one that draws the subject best is often already
overfitted. The rule keeps the checkpoint that has learned the subject and still does what a
prompt says:

1. the class is kept: drift (the share of class-prompt samples that now look like the subject) is at
   most `max_drift`;
2. the subject is learned: among those, subject fidelity within `subject_margin` of the best one's,
   or within twice the sampling noise of the difference when that is larger (with a few samples per
   prompt, two scores of one model differ by more than a fixed margin);
3. among them, the highest prompt fidelity; a tie (a saturated score: every new prompt followed)
   goes to the higher subject fidelity, then to the earlier step (the same scores always give the
   same pick);
4. no pick when no checkpoint keeps the class, or when the best subject fidelity is not above the
   base model's by that margin (the subject was not learned): the run's result stays its last
   weights, and the reason says which condition failed and what to change.

Measured on the toy world (README, "Which checkpoint to keep"): against the last checkpoint of full
fine-tuning the pick kept subject fidelity within the seed-to-seed noise and raised prompt fidelity.
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
    subject_se: float = 0.0  # the standard error of `subject` (sampling noise)


@dataclass(frozen=True)
class PickRule:
    subject_margin: float = 0.02
    max_drift: float = 0.2

    def describe(self) -> str:
        return (f"among checkpoints whose class drift is at most {self.max_drift:.0%}, those whose subject fidelity "
                f"is within {self.subject_margin:g} of the best (or twice the sampling noise, when larger) have "
                "learned the subject; of them, the highest prompt fidelity; ties go to the higher subject fidelity, "
                "then to the earlier step")

    def margin(self, a: CheckpointScores, b: CheckpointScores) -> float:
        return max(self.subject_margin, 2 * math.hypot(a.subject_se, b.subject_se))

    def keeps_class(self, scores: CheckpointScores) -> bool:
        return scores.drift <= self.max_drift


@dataclass(frozen=True)
class Pick:
    step: int | None  # None: no checkpoint passed
    reason: str


def pick_best(checkpoints: Sequence[CheckpointScores], base: CheckpointScores, rule: PickRule = PickRule()) -> Pick:
    """The checkpoint `rule` keeps, given each checkpoint's scores and the base model's."""
    if not checkpoints:
        return Pick(None, "no checkpoint was scored")
    kept = [s for s in checkpoints if rule.keeps_class(s)]
    if not kept:
        return Pick(None, f"no checkpoint passed: the class drifted past {rule.max_drift:.0%} at every checkpoint "
                          "(turn prior preservation on, or raise its weight). The run's last weights stay its result.")
    top = max(kept, key=lambda s: (s.subject, -s.step))
    if top.subject <= base.subject + rule.margin(top, base):
        return Pick(None, f"no checkpoint passed: subject fidelity never rose above the base model's "
                          f"{base.subject:.3f} by more than its noise (best {top.subject:.3f} at step {top.step}): "
                          "the subject was not learned (more steps or a higher learning rate). The run's last "
                          "weights stay its result.")
    learned = [s for s in kept if s.subject >= top.subject - rule.margin(s, top)]
    best = max(learned, key=lambda s: (s.prompt, s.subject, -s.step))
    return Pick(best.step, f"step {best.step}: prompt fidelity {best.prompt:.3f}, subject fidelity {best.subject:.3f} "
                           f"(best {top.subject:.3f} at step {top.step}), drift {best.drift:.0%}; {len(learned)} of "
                           f"{len(checkpoints)} checkpoints kept the class and learned the subject")


def _scores(row: dict) -> CheckpointScores:
    return CheckpointScores(int(row["step"]), float(row["subject"]), float(row["prompt"]), float(row["drift"]),
                            float(row.get("subject_se", 0.0)))


def pick_from_rows(rows: Sequence[dict], available: set[int] | None = None, rule: PickRule = PickRule()) -> Pick:
    """The pick over the rows of a run's scores.jsonl (trainer/scores/measure.py): the base row gives the base
    model's scores; `available` limits it to the checkpoints still on disk."""
    base = next((row for row in rows if row.get("base")), None)
    if base is None:
        return Pick(None, "the base model was not scored, so there is nothing to compare with")
    checkpoints = [_scores(row) for row in rows
                   if not row.get("base") and (available is None or row["step"] in available)]
    return pick_best(checkpoints, _scores(base), rule)
