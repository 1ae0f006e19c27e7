"""Paired differences over runs: known answers worked out by hand."""

import math

import pytest

from mbdml.paired import paired_difference, sign_flip_p_value


def test_three_runs_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027, half-width 4.3027 / sqrt(3) = 2.4841
    d = paired_difference({0: 0.71, 1: 0.72, 2: 0.73}, {0: 0.70, 1: 0.70, 2: 0.70})
    assert d.n == 3
    assert d.mean == pytest.approx(0.02)
    assert d.std == pytest.approx(0.01)
    assert d.ci_low == pytest.approx(0.02 - 0.024841, abs=1e-6)
    assert d.ci_high == pytest.approx(0.02 + 0.024841, abs=1e-6)
    assert d.level and d.verdict == "level"
    # of the 8 sign patterns only all-plus and all-minus reach |mean| = 2
    assert d.p_value == pytest.approx(2 / 8)
    assert d.format() == "+2.00 [-0.48, +4.48] p=0.25"


def test_five_consistent_runs_are_called_higher():
    a = {r: 0.80 + 0.01 * r for r in range(5)}
    b = {r: a[r] - delta for r, delta in enumerate([0.010, 0.011, 0.009, 0.010, 0.0105])}
    d = paired_difference(a, b)
    assert not d.level and d.verdict == "higher"
    assert d.ci_low > 0
    assert d.p_value == pytest.approx(2 / 32)
    assert paired_difference(b, a).verdict == "lower"


def test_only_shared_runs_with_values_are_paired():
    d = paired_difference({0: 0.5, 1: 0.6, 2: None, 3: 0.9}, {0: 0.4, 1: 0.4, 2: 0.3, 5: 0.1})
    assert d.runs == (0, 1) and d.n == 2
    assert d.mean == pytest.approx(0.15)
    assert paired_difference({0: 0.5}, {1: 0.5}) is None
    one = paired_difference({0: 0.5}, {0: 0.4})
    assert one.ci_low is None and one.level and "1 run" in one.format()


def test_sign_flip_test_known_cases():
    assert sign_flip_p_value([0.5, -0.5]) == 1.0  # mean 0: every pattern is as extreme
    assert sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0
    # 1, 1, 1, -1: |mean| 0.5 is reached by the patterns with at most one sign against the
    # majority: 2 * (1 + 4) = 10 of 16
    assert sign_flip_p_value([1.0, 1.0, 1.0, -1.0]) == pytest.approx(10 / 16)
    # many runs all the same way: sampled patterns, a tiny p-value, reproducible
    many = [0.01 + 0.001 * i for i in range(20)]
    p = sign_flip_p_value(many)
    assert p < 1e-3 and p == sign_flip_p_value(many)
    with pytest.raises(ValueError):
        sign_flip_p_value([])


def test_interval_matches_the_t_formula_for_ten_runs():
    from scipy.stats import t

    a = {r: 0.5 + 0.003 * math.sin(r) for r in range(10)}
    b = {r: 0.5 + 0.002 * math.cos(r) for r in range(10)}
    diffs = [a[r] - b[r] for r in range(10)]
    mean = sum(diffs) / 10
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 9)
    half = t.ppf(0.975, 9) * sd / math.sqrt(10)
    d = paired_difference(a, b)
    assert (d.ci_low, d.ci_high) == pytest.approx((mean - half, mean + half))
