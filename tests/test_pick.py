"""The rule that picks the checkpoint to keep (trainer/scores/pick.py), on synthetic score tables."""

from __future__ import annotations

from trainer.scores.pick import CheckpointScores, PickRule, pick_best, pick_from_rows

BASE = CheckpointScores(0, 0.50, 0.30, 0.0)


def table(*rows: tuple[int, float, float, float]) -> list[CheckpointScores]:
    return [CheckpointScores(step, subject, prompt, drift) for step, subject, prompt, drift in rows]


def test_of_the_checkpoints_that_learned_the_subject_and_kept_the_class_the_best_at_prompts_is_picked():
    scores = table((100, 0.60, 0.31, 0.00),   # prompts best, but the subject is not learned yet
                   (200, 0.79, 0.29, 0.10),   # learned (0.01 below the best), prompts better than 300's
                   (300, 0.80, 0.22, 0.10),   # the best subject, but new prompts fail more often
                   (400, 0.85, 0.30, 0.50))   # a better subject, but the class drifted
    pick = pick_best(scores, BASE)
    assert pick.step == 200
    assert "2 of 4 checkpoints kept the class and learned the subject" in pick.reason
    assert "(best 0.800 at step 300)" in pick.reason


def test_when_prompt_fidelity_ties_the_subject_decides_then_the_earlier_step():
    saturated = table((100, 0.69, 1.0, 0.0), (200, 0.70, 1.0, 0.0), (300, 0.68, 1.0, 0.0))  # all learned
    assert pick_best(saturated, BASE).step == 200


def test_a_tie_goes_to_the_earlier_step_whatever_the_order():
    scores = table((300, 0.70, 0.30, 0.0), (100, 0.70, 0.30, 0.0), (200, 0.65, 0.35, 0.0))
    assert pick_best(scores, BASE).step == 100
    assert pick_best(list(reversed(scores)), BASE).step == 100


def test_the_margins_are_the_rules():
    scores = table((100, 0.75, 0.35, 0.0), (200, 0.80, 0.25, 0.3))
    assert pick_best(scores, BASE).step == 100  # 200 drifted past 20%
    wider = PickRule(subject_margin=0.01, max_drift=0.3)
    assert pick_best(scores, BASE, wider).step == 200  # 100 is now 0.05 below the best: not learned
    assert pick_best(scores, BASE, PickRule(subject_margin=0.06, max_drift=0.3)).step == 100
    assert "within 0.06 of the best" in PickRule(subject_margin=0.06).describe()


def test_a_noisy_subject_score_is_allowed_twice_its_noise_and_no_more():
    # 0.76 vs the best 0.84 from a few samples: within twice the noise of the difference
    # (2 * hypot(0.03, 0.03) = 0.085), so step 100 counts as learned; 0.74 does not (0.10 below).
    noisy = [CheckpointScores(100, 0.76, 0.9, 0.0, subject_se=0.03), CheckpointScores(200, 0.84, 0.5, 0.0, subject_se=0.03),
             CheckpointScores(300, 0.74, 1.0, 0.0, subject_se=0.03)]
    assert pick_best(noisy, BASE).step == 100
    precise = [CheckpointScores(s.step, s.subject, s.prompt, s.drift) for s in noisy]
    assert pick_best(precise, BASE).step == 200  # without noise the fixed 0.02 margin holds


def test_when_none_passes_there_is_no_pick_and_the_reason_says_what_failed():
    drifted = pick_best(table((100, 0.8, 0.30, 0.6), (200, 0.9, 0.30, 0.3)), BASE)
    assert drifted.step is None and "drifted past 20% at every checkpoint" in drifted.reason
    not_learned = pick_best(table((100, 0.51, 0.30, 0.0), (200, 0.515, 0.30, 0.0)), BASE)
    assert not_learned.step is None and "the subject was not learned" in not_learned.reason
    assert "best 0.515 at step 200" in not_learned.reason
    assert pick_best([], BASE).step is None


def test_the_pick_over_a_runs_rows_uses_the_base_row_and_the_checkpoints_on_disk():
    rows = [{"step": 0, "base": True, "subject": 0.5, "prompt": 0.30, "drift": 0.0},
            {"step": 100, "subject": 0.7, "prompt": 0.30, "drift": 0.0},
            {"step": 200, "subject": 0.9, "prompt": 0.28, "drift": 0.0, "subject_se": 0.0}]
    assert pick_from_rows(rows).step == 200
    assert pick_from_rows(rows, available={100}).step == 100  # step 200's checkpoint was deleted
    assert pick_from_rows(rows[1:]).step is None  # no base row: nothing to compare with
