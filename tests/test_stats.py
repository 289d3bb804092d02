"""Significance tests and intervals against values worked out by hand or published."""

from __future__ import annotations

import math

import pytest

from core import stats


def test_z_and_chi_square_tail_match_tables():
    assert stats.z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert stats.z_value(0.99) == pytest.approx(2.575829, abs=1e-6)
    assert stats.chi2_sf_1df(3.841458820694124) == pytest.approx(0.05, abs=1e-9)
    assert stats.chi2_sf_1df(6.634896601021214) == pytest.approx(0.01, abs=1e-9)
    assert stats.chi2_sf_1df(0) == 1.0
    with pytest.raises(ValueError):
        stats.z_value(1.5)


def test_wilson_interval_known_values():
    lo, hi = stats.wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_mcnemar_exact_mid_p_and_chi_square():
    r = stats.mcnemar(1, 9)
    # Exact: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * 11/1024; mid-p subtracts P(X = 1) = 10/1024.
    assert r.exact_p == pytest.approx(22 / 1024)
    assert r.mid_p == pytest.approx(12 / 1024)
    assert r.chi2 == pytest.approx(4.9) and r.chi2_p == pytest.approx(0.026857, abs=1e-6)
    assert r.p_value == r.exact_p  # few discordant pairs: the exact test is reported
    r = stats.mcnemar(0, 5)
    assert (r.exact_p, r.mid_p) == (pytest.approx(0.0625), pytest.approx(0.03125))
    r = stats.mcnemar(3, 3)
    assert r.exact_p == 1.0 and r.mid_p == pytest.approx(1.0) and r.chi2 == 0.0
    assert stats.mcnemar(0, 0).exact_p == 1.0


def test_mcnemar_textbook_example():
    # The worked example of McNemar's test on Wikipedia: b = 121, c = 59; with continuity correction
    # chi2 = (|121 - 59| - 1)^2 / 180 = 20.672, p < 0.0001.
    r = stats.mcnemar(121, 59)
    assert r.chi2 == pytest.approx(20.6722, abs=1e-4)
    assert r.chi2_p == pytest.approx(math.erfc(math.sqrt(20.6722 / 2)), rel=1e-3) and r.chi2_p < 1e-4
    assert r.p_value == r.chi2_p and r.exact_p < 1e-4


def test_mcnemar_from_paired_outcomes():
    a = [True, True, False, False, True, False]
    b = [True, False, True, True, True, True]
    r = stats.mcnemar_pairs(a, b)
    assert (r.b, r.c) == (1, 3)
    with pytest.raises(ValueError, match="differ in length"):
        stats.mcnemar_pairs([True], [])


def test_paired_bootstrap_matches_the_normal_approximation():
    a = [0.0] * 100
    b = [0.0, 1.0] * 50     # differences: mean 0.5, sd 0.5 -> 95% CI 0.5 +- 1.96 * 0.05
    r = stats.paired_bootstrap(a, b, resamples=4000, seed=1)
    assert r.mean_diff == 0.5 and r.n == 100 and (r.mean_a, r.mean_b) == (0.0, 0.5)
    assert r.ci_low == pytest.approx(0.5 - 0.098, abs=0.02) and r.ci_high == pytest.approx(0.5 + 0.098, abs=0.02)
    assert r.significant and r.p_value < 0.001
    assert stats.paired_bootstrap(a, b, resamples=4000, seed=1) == r   # deterministic for a seed


def test_paired_bootstrap_edge_cases():
    same = stats.paired_bootstrap([0.2, 0.4, 0.9], [0.2, 0.4, 0.9])
    assert (same.mean_diff, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not same.significant
    shift = stats.paired_bootstrap([0.1, 0.2, 0.3], [0.6, 0.7, 0.8])
    assert shift.mean_diff == pytest.approx(0.5) and shift.ci_low == pytest.approx(0.5) and shift.p_value == 0.0
    noisy = stats.paired_bootstrap([0.5, 0.6, 0.4, 0.5], [0.6, 0.5, 0.5, 0.4])
    assert noisy.ci_low < 0 < noisy.ci_high and noisy.p_value > 0.3 and not noisy.significant
    with pytest.raises(ValueError, match="no paired scores"):
        stats.paired_bootstrap([], [])
    with pytest.raises(ValueError, match="at least 100"):
        stats.paired_bootstrap([1], [1], resamples=10)


def test_bootstrap_mean_interval_and_verdict():
    lo, hi = stats.bootstrap_mean_interval([0.0, 1.0] * 50, resamples=4000)
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert stats.bootstrap_mean_interval([0.3]) == (0.3, 0.3)
    assert all(math.isnan(x) for x in stats.bootstrap_mean_interval([]))
    assert stats.verdict(0.01, 0.2, better="v2", worse="v1") == "v2 is better than v1 (p = 0.01)"
    assert stats.verdict(0.01, -0.2, better="v2", worse="v1") == "v1 is better than v2 (p = 0.01)"
    assert stats.verdict(0.2, 0.3).startswith("no significant difference")
