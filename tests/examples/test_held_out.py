"""held_out.recommend_weight: the rule that turns paired results at several NIR weights into advice."""

from __future__ import annotations

import math

import pytest

from .helpers import import_example

held_out = import_example("held_out")
recommend_weight, paired_differences = held_out.recommend_weight, held_out.paired_differences

BASE = [0.40, 0.45, 0.50, 0.55, 0.60]


def _arm(*diffs):
    """Per-seed results that differ from BASE by ``diffs`` (arm minus baseline)."""
    return [b + d for b, d in zip(BASE, diffs)]


def test_picks_the_eligible_weight_with_the_highest_median():
    arms = {
        0.005: _arm(0.010, 0.020, 0.006, -0.002, 0.015),  # median 0.010
        0.01: _arm(0.030, 0.020, 0.025, -0.004, 0.010),  # median 0.020: the pick
        0.02: _arm(-0.030, -0.020, 0.040, -0.010, 0.050),  # median -0.010
    }
    advice = recommend_weight(BASE, arms)
    assert advice["weight"] == 0.01
    assert advice["reason"].startswith("NIR beat ProxyAnchor on the validation classes at weight 0.01:")
    assert "median MAP@R +0.0200" in advice["reason"] and "better in 4 of 5 seeds" in advice["reason"]
    assert advice["reason"].endswith("use nir_weight=0.01.")
    # The table is paired_differences of each arm, arm minus baseline, in the seed order given.
    assert set(advice["table"]) == set(arms)
    for w, values in arms.items():
        expected = paired_differences([a - b for a, b in zip(values, BASE)])
        assert advice["table"][w] == pytest.approx(expected)


def test_a_collapse_rules_a_weight_out_however_good_its_median():
    arms = {
        0.01: _arm(0.05, 0.05, 0.05, 0.05, -0.11),  # median +0.05, mean +0.018, one seed collapsed
        0.005: _arm(0.01, 0.01, 0.01, 0.0, -0.01),  # modest but clean
    }
    advice = recommend_weight(BASE, arms)
    assert advice["table"][0.01]["collapses"] == 1
    assert advice["weight"] == 0.005


def test_a_non_finite_run_counts_as_a_collapse():
    arms = {0.01: _arm(0.05, 0.05, math.nan, 0.05, 0.05)}
    advice = recommend_weight(BASE, arms)
    assert advice["table"][0.01]["collapses"] == 1 and advice["weight"] == 0.0


def test_all_losing_weights_mean_leave_nir_off():
    arms = {0.005: _arm(-0.01, -0.02, 0.003, -0.005, -0.01), 0.01: _arm(-0.02, -0.03, -0.01, 0.001, -0.02)}
    advice = recommend_weight(BASE, arms)
    assert advice["weight"] == 0.0
    reason = advice["reason"]
    assert reason.startswith("NIR did not beat ProxyAnchor on the validation classes at any weight tried")
    assert "best: weight 0.005: median MAP@R -0.0100" in reason  # the least bad arm is named
    assert reason.endswith("leave NIR off here.")


def test_ties_are_not_wins():
    advice = recommend_weight(BASE, {0.01: list(BASE)})
    assert advice["weight"] == 0.0
    assert (advice["table"][0.01]["wins"], advice["table"][0.01]["losses"]) == (0, 0)


def test_equal_wins_and_losses_are_not_enough():
    # Median and mean clear the bar, but three seeds lost: no majority of seeds.
    base = BASE + [0.65]
    arm = [b + d for b, d in zip(base, [0.03, 0.03, 0.03, -0.001, -0.001, -0.001])]
    advice = recommend_weight(base, {0.01: arm})
    p = advice["table"][0.01]
    assert p["median"] > held_out.MIN_GAIN and p["mean"] > 0 and p["wins"] == p["losses"] == 3
    assert advice["weight"] == 0.0


def test_a_negative_mean_rules_a_weight_out():
    advice = recommend_weight(BASE, {0.01: _arm(0.01, 0.01, 0.01, -0.09, -0.09)})
    p = advice["table"][0.01]
    assert p["median"] > held_out.MIN_GAIN and p["wins"] > p["losses"] and p["collapses"] == 0 and p["mean"] < 0
    assert advice["weight"] == 0.0


def test_a_gain_within_the_noise_floor_is_not_taken():
    """Every seed better by 0.004 is below MIN_GAIN: the conservative default says no."""
    arms = {0.01: _arm(0.004, 0.004, 0.004, 0.004, 0.004)}
    assert held_out.MIN_GAIN > 0.004
    assert recommend_weight(BASE, arms)["weight"] == 0.0
    assert recommend_weight(BASE, arms, min_gain=0.003)["weight"] == 0.01


def test_equal_medians_go_to_the_higher_mean_then_the_smaller_weight():
    a = _arm(0.01, 0.01, 0.01, 0.02, 0.02)  # median 0.01, mean 0.014
    b = _arm(0.01, 0.01, 0.01, 0.02, 0.04)  # median 0.01, mean 0.018
    assert recommend_weight(BASE, {0.01: a, 0.02: b})["weight"] == 0.02
    assert recommend_weight(BASE, {0.02: a, 0.01: list(a)})["weight"] == 0.01


def test_names_in_the_reason_and_an_empty_set_of_weights():
    advice = recommend_weight(BASE, {0.01: _arm(-0.01, -0.01, -0.01, -0.01, -0.01)}, baseline_name="SoftTriple")
    assert "did not beat SoftTriple" in advice["reason"]
    empty = recommend_weight(BASE, {})
    assert empty["weight"] == 0.0 and empty["table"] == {} and "leave NIR off" in empty["reason"]


@pytest.mark.parametrize(
    "baseline, arms, message",
    [
        ([], {0.01: []}, "at least one seed"),
        (BASE, {0.01: BASE[:3]}, "results of 3 seeds, the baseline of 5"),
        (BASE, {0.0: BASE}, "positive numbers, got 0.0"),
        (BASE, {math.nan: BASE}, "positive numbers, got nan"),
    ],
)
def test_inputs_that_cannot_be_paired_are_refused(baseline, arms, message):
    with pytest.raises(ValueError, match=message):
        recommend_weight(baseline, arms)


def _brute_force_p(diffs):
    """Share of the 2^n sign patterns whose sum is at least as far from 0 as the observed one."""
    import itertools

    observed = abs(sum(diffs))
    patterns = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12 for signs in patterns) / len(patterns)


@pytest.mark.parametrize(
    "diffs",
    [
        [0.01, 0.02, 0.03, 0.04, 0.05],  # every seed better: 2 / 32, the smallest p of 5 seeds
        [0.01, -0.01],  # symmetric: p = 1
        [0.02, -0.005, 0.013, 0.001, -0.03, 0.008, 0.011],
        [-0.04, -0.02, -0.03, 0.001, -0.05, -0.01, 0.002, -0.02, -0.03, -0.004, -0.01, 0.005],
    ],
)
def test_sign_flip_p_is_the_share_of_sign_patterns_at_least_as_extreme(diffs):
    assert held_out.sign_flip_p(diffs) == pytest.approx(_brute_force_p(diffs))
    assert paired_differences(diffs)["p"] == held_out.sign_flip_p(diffs)


def test_sign_flip_p_beyond_the_exact_limit_is_drawn_and_reproducible():
    # 20 seeds, all better: the exact p is 2 / 2^20; the drawn patterns give about (1 + 2^-3) / 2^16.
    diffs = [0.01 + 0.001 * i for i in range(20)]
    p = held_out.sign_flip_p(diffs)
    assert p == held_out.sign_flip_p(diffs) and p < 1e-3
    # No effect: the differences cancel, p near 1.
    assert held_out.sign_flip_p([0.01, -0.01] * 10) > 0.9
    with pytest.raises(ValueError, match="at least one"):
        held_out.sign_flip_p([])


# recommend_with_lr_control: the NIR pick checked against the baseline at a lower learning rate.
NIR_ARMS = {
    0.005: _arm(0.010, 0.020, 0.006, -0.002, 0.015),  # median 0.010
    0.01: _arm(0.030, 0.020, 0.025, -0.004, 0.010),  # median 0.020: recommend_weight's pick
}
LOSING_ARMS = {0.01: _arm(-0.01, -0.02, 0.003, -0.005, -0.01)}  # no weight is eligible


def test_a_control_that_gains_as_much_as_the_pick_turns_nir_off_and_lowers_the_lr():
    assert recommend_weight(BASE, NIR_ARMS)["weight"] == 0.01
    control = _arm(0.030, 0.040, 0.030, 0.010, 0.020)  # median 0.030 >= 0.020
    advice = held_out.recommend_with_lr_control(BASE, NIR_ARMS, control, 0.5)
    assert advice["weight"] == 0.0 and advice["lr_factor"] == 0.5
    assert advice["reason"] == (
        "ProxyAnchor at 0.5x the learning rate gained as much (+0.0300 median MAP@R) as NIR at weight 0.01 "
        "(+0.0200): lower the learning rate rather than add NIR."
    )
    assert advice["control"] == pytest.approx(paired_differences([c - b for c, b in zip(control, BASE)]))
    assert advice["table"] == recommend_weight(BASE, NIR_ARMS)["table"]
    # An equal median is "as much": the control wins the tie.
    tie = held_out.recommend_with_lr_control(BASE, NIR_ARMS, _arm(0.02, 0.02, 0.02, 0.01, 0.03), 0.25)
    assert tie["weight"] == 0.0 and tie["lr_factor"] == 0.25 and "0.25x the learning rate" in tie["reason"]


def test_a_control_that_gains_less_leaves_the_pick_standing():
    control = _arm(0.010, 0.015, 0.010, 0.000, 0.020)  # median 0.010 < 0.020, itself eligible
    advice = held_out.recommend_with_lr_control(BASE, NIR_ARMS, control, 0.5)
    assert advice["weight"] == 0.01 and advice["lr_factor"] == 1.0
    reason = advice["reason"]
    assert reason.startswith("NIR beat ProxyAnchor on the validation classes at weight 0.01: median MAP@R +0.0200")
    assert "more than ProxyAnchor at 0.5x the learning rate gained (median MAP@R +0.0100)" in reason
    assert reason.endswith("use nir_weight=0.01.")


def test_a_control_with_the_higher_median_but_a_collapse_turns_nir_off_and_keeps_the_lr():
    control = _arm(0.05, 0.05, 0.05, 0.05, -0.15)  # median 0.05, but one seed collapsed
    advice = held_out.recommend_with_lr_control(BASE, NIR_ARMS, control, 0.5)
    assert advice["weight"] == 0.0 and advice["lr_factor"] == 1.0
    assert "gained as much (+0.0500 median MAP@R) as NIR at weight 0.01 (+0.0200), but not reliably" in advice["reason"]
    assert advice["reason"].endswith("leave NIR off and the learning rate as it is.")


def test_nothing_eligible_but_an_eligible_control_lowers_the_lr():
    control = _arm(0.010, 0.020, 0.006, -0.002, 0.015)
    advice = held_out.recommend_with_lr_control(BASE, LOSING_ARMS, control, 0.5)
    assert advice["weight"] == 0.0 and advice["lr_factor"] == 0.5
    reason = advice["reason"]
    assert reason.startswith("NIR did not beat ProxyAnchor on the validation classes at any weight tried")
    assert "leave NIR off here; a lower learning rate helped (ProxyAnchor at 0.5x the learning rate: " in reason
    assert "median MAP@R +0.0100, mean +0.0098, better in 4 of 5 seeds, 0 collapses" in reason
    assert reason.endswith("lower it to 0.5x.")


@pytest.mark.parametrize(
    "control",
    [
        _arm(0.004, 0.004, 0.004, 0.004, 0.004),  # within the noise floor
        _arm(-0.01, 0.01, -0.01, 0.02, -0.01),  # more losses than wins
    ],
)
def test_nothing_eligible_and_an_ineligible_control_changes_nothing(control):
    advice = held_out.recommend_with_lr_control(BASE, LOSING_ARMS, control, 0.5)
    assert advice["weight"] == 0.0 and advice["lr_factor"] == 1.0
    assert advice["reason"] == recommend_weight(BASE, LOSING_ARMS)["reason"]


def test_without_a_control_the_answer_is_recommend_weights():
    advice = held_out.recommend_with_lr_control(BASE, NIR_ARMS, None)
    expected = recommend_weight(BASE, NIR_ARMS)
    assert advice == {**expected, "lr_factor": 1.0, "control": None}


@pytest.mark.parametrize(
    "control, factor, message",
    [
        (BASE[:3], 0.5, "the learning-rate control has results of 3 seeds, the baseline of 5"),
        (BASE, 1.0, r"factor must be in \(0, 1\), got 1.0"),
        (BASE, 0.0, r"factor must be in \(0, 1\), got 0.0"),
        (BASE, None, r"factor must be in \(0, 1\), got None"),
    ],
)
def test_a_control_that_cannot_be_paired_is_refused(control, factor, message):
    with pytest.raises(ValueError, match=message):
        held_out.recommend_with_lr_control(BASE, NIR_ARMS, control, factor)
