"""Statistics for comparing evaluation results, on the stdlib: Wilson intervals, McNemar's test, paired bootstrap.

McNemar compares paired pass/fail outcomes (the same items under two versions) using only the discordant pairs:
b = items version A passes and B fails, c = items A fails and B passes. The paired bootstrap compares paired scores
by resampling items with replacement.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist, fmean
from typing import Sequence

from core.errors import InvalidInput


class StatsError(InvalidInput):
    """The figures cannot be computed from these arguments (a ValueError, as before); the message says why."""


def z_value(confidence: float = 0.95) -> float:
    """The two-sided standard normal quantile for a confidence level (1.959964 for 0.95)."""
    if not 0 < confidence < 1:
        raise StatsError(f"confidence must be between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes/n; (0, 1) when n is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise StatsError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def chi2_sf_1df(x: float) -> float:
    """P(X >= x) for a chi-square variable with one degree of freedom."""
    if x <= 0:
        return 1.0
    return math.erfc(math.sqrt(x / 2))


def _binom_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact (big integers)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def _binom_half_pmf(k: int, n: int) -> float:
    return math.comb(n, k) / 2 ** n


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on the discordant pairs b (A pass, B fail) and c (A fail, B pass)."""

    b: int
    c: int
    exact_p: float       # two-sided exact binomial test
    mid_p: float         # two-sided mid-p (less conservative than exact)
    chi2: float          # with Edwards' continuity correction
    chi2_p: float

    @property
    def n_discordant(self) -> int:
        """Pairs on which the two sides disagree."""
        return self.b + self.c

    @property
    def p_value(self) -> float:
        """The p-value reported: exact for few discordant pairs (< 25), chi-square otherwise."""
        return self.exact_p if self.n_discordant < 25 else self.chi2_p


def mcnemar(b: int, c: int) -> McNemarResult:
    """McNemar's test for b pairs where only A passed and c pairs where only B passed."""
    if b < 0 or c < 0:
        raise StatsError(f"counts must not be negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return McNemarResult(b, c, 1.0, 1.0, 0.0, 1.0)
    m = min(b, c)
    tail = _binom_half_cdf(m, n)
    exact = min(1.0, 2 * tail)
    mid = min(1.0, 2 * tail - _binom_half_pmf(m, n))
    chi2 = (max(abs(b - c) - 1, 0)) ** 2 / n
    return McNemarResult(b, c, exact, mid, chi2, chi2_sf_1df(chi2))


def mcnemar_pairs(a: Sequence[bool], b: Sequence[bool]) -> McNemarResult:
    """McNemar's test on paired pass/fail outcomes of the same items under A and B."""
    if len(a) != len(b):
        raise StatsError(f"paired outcomes differ in length: {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return mcnemar(only_a, only_b)


@dataclass(frozen=True)
class BootstrapResult:
    """Mean difference B - A over paired items, its percentile confidence interval and a two-sided p-value."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    resamples: int
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]) of sorted values."""
    if not sorted_values:
        raise StatsError("no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> BootstrapResult:
    """Paired bootstrap of mean(b - a): resample items with replacement (deterministic for a seed)."""
    if len(a) != len(b):
        raise StatsError(f"paired scores differ in length: {len(a)} and {len(b)}")
    if not a:
        raise StatsError("no paired scores to compare")
    if resamples < 100:
        raise StatsError(f"resamples must be at least 100, got {resamples}")
    diffs = [float(y) - float(x) for x, y in zip(a, b)]
    n = len(diffs)
    observed = fmean(diffs)
    rng = random.Random(seed)
    means = sorted(fmean(rng.choices(diffs, k=n)) for _ in range(resamples))
    alpha = 1 - confidence
    low, high = _percentile(means, alpha / 2), _percentile(means, 1 - alpha / 2)
    # Two-sided p-value: how often a resampled difference, centred on zero, is at least as far out as observed.
    if max(diffs) - min(diffs) <= 1e-12:  # every pair differs by the same amount: nothing to resample
        p = 1.0 if abs(observed) <= 1e-12 else 0.0
    else:
        extreme = sum(1 for m in means if abs(m - observed) >= abs(observed) - 1e-12)
        p = min(1.0, (extreme + 1) / (resamples + 1))
    return BootstrapResult(n, fmean(float(x) for x in a), fmean(float(y) for y in b), observed, low, high, p,
                           resamples, confidence)


def bootstrap_mean_interval(values: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean; (v, v) for a single value, (nan, nan) for none."""
    if not values:
        return math.nan, math.nan
    values = [float(v) for v in values]
    if len(values) == 1 or all(v == values[0] for v in values):
        return values[0], values[0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(fmean(rng.choices(values, k=n)) for _ in range(resamples))
    alpha = 1 - confidence
    return _percentile(means, alpha / 2), _percentile(means, 1 - alpha / 2)


def verdict(p_value: float, diff: float, *, alpha: float = 0.05, better: str = "B", worse: str = "A") -> str:
    """A one-line reading of a test: which side is better and whether the difference is significant."""
    if diff == 0 or p_value >= alpha:
        return f"no significant difference (p = {p_value:.3g})"
    winner, loser = (better, worse) if diff > 0 else (worse, better)
    return f"{winner} is better than {loser} (p = {p_value:.3g})"
