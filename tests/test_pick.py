"""The rule that picks the checkpoint to keep (trainer/pick.py), on synthetic score tables."""

from __future__ import annotations

from trainer.pick import CheckpointScores, PickRule, pick_best

BASE_PROMPT = 0.30


def table(*rows: tuple[int, float, float, float]) -> list[CheckpointScores]:
    return [CheckpointScores(step, subject, prompt, drift) for step, subject, prompt, drift in rows]


def test_the_most_faithful_checkpoint_that_keeps_prompts_and_class_is_picked():
    scores = table((100, 0.60, 0.30, 0.00),
                   (200, 0.70, 0.29, 0.10),   # eligible, the best subject among the eligible
                   (300, 0.80, 0.25, 0.10),   # better subject, but prompts fell by 0.05 > 0.02
                   (400, 0.85, 0.30, 0.50))   # better subject, but the class drifted
    pick = pick_best(scores, BASE_PROMPT)
    assert pick.step == 200 and "2 of 4 checkpoints eligible" in pick.reason


def test_a_tie_goes_to_the_earlier_step_whatever_the_order():
    scores = table((300, 0.70, 0.30, 0.0), (100, 0.70, 0.30, 0.0), (200, 0.65, 0.31, 0.0))
    assert pick_best(scores, BASE_PROMPT).step == 100
    assert pick_best(list(reversed(scores)), BASE_PROMPT).step == 100


def test_the_margins_are_the_rules():
    scores = table((100, 0.6, 0.30, 0.0), (200, 0.8, 0.27, 0.3))
    assert pick_best(scores, BASE_PROMPT).step == 100
    assert pick_best(scores, BASE_PROMPT, PickRule(prompt_margin=0.05, max_drift=0.3)).step == 200
    assert "within 0.05" in PickRule(prompt_margin=0.05).describe()


def test_when_none_passes_there_is_no_pick_and_the_reason_says_what_failed():
    prompts_fell = pick_best(table((100, 0.8, 0.20, 0.0), (200, 0.9, 0.10, 0.0)), BASE_PROMPT)
    assert prompts_fell.step is None and "prompt fidelity fell" in prompts_fell.reason
    assert "drifted" not in prompts_fell.reason
    drifted = pick_best(table((100, 0.8, 0.30, 0.6)), BASE_PROMPT)
    assert drifted.step is None and "drifted past 25%" in drifted.reason and "prompt fidelity" not in drifted.reason
    never_both = pick_best(table((100, 0.8, 0.30, 0.9), (200, 0.9, 0.1, 0.0)), BASE_PROMPT)
    assert never_both.step is None and "both" in never_both.reason
    assert pick_best([], BASE_PROMPT).step is None


def test_a_noisy_prompt_score_is_allowed_twice_its_noise_and_no_more():
    # 0.75 vs the base's 0.90 from a dozen samples: within twice the noise of the difference
    # (2 * hypot(0.06, 0.05) = 0.156), so the checkpoint stays eligible; 0.70 is not (0.20 below).
    noisy = [CheckpointScores(100, 0.8, 0.75, 0.0, prompt_se=0.06), CheckpointScores(200, 0.9, 0.70, 0.0, prompt_se=0.06)]
    assert pick_best(noisy, 0.90, base_se=0.05).step == 100
    assert pick_best(noisy, 0.90).step is None  # without the noise both fall more than 0.02 below
    # A precise score keeps the fixed margin: the noise allowance never tightens the rule.
    precise = [CheckpointScores(100, 0.8, 0.885, 0.0, prompt_se=0.001)]
    assert pick_best(precise, 0.90, base_se=0.001).step == 100


def test_the_pick_over_a_runs_rows_uses_the_base_row_and_the_checkpoints_on_disk():
    from trainer.pick import pick_from_rows

    rows = [{"step": 0, "base": True, "subject": 0.5, "prompt": 0.30, "drift": 0.0, "prompt_se": 0.0},
            {"step": 100, "subject": 0.7, "prompt": 0.30, "drift": 0.0},
            {"step": 200, "subject": 0.9, "prompt": 0.30, "drift": 0.0}]
    assert pick_from_rows(rows).step == 200
    assert pick_from_rows(rows, available={100}).step == 100  # step 200's checkpoint was deleted
    assert pick_from_rows(rows[1:]).step is None  # no base row: nothing to compare with
