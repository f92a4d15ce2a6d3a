"""Comparing noisy scores of the same seed ranges: the statistics promotion, the sampler sweep and
the EMA-length choice share (pure: no store, no Ray).

Every evaluation scores k disjoint seed ranges; two evaluations on the same ranges are *paired*
(range i is easy or hard for both), so their comparison is a paired t-test on the per-range
differences. `welch_test` is the unpaired test, for records without per-range scores.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

from tasks.records import MetricSample


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (scipy imported here: `diffpipe --help` skips its second of import)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, df))


@dataclass(frozen=True)
class NoiseTest:
    """One comparison of two score samples: the improvement (champion - challenger, mean), its
    standard error and degrees of freedom, the bar it had to clear (`threshold`), and the verdict."""

    test: str  # "paired" or "welch"
    improvement: float
    standard_error: float
    df: float
    margin: float  # the bar in standard errors: t(1 - alpha, df)
    threshold: float  # the bar in metric units: max(margin * se, min_improvement * champion mean)
    promote: bool


def paired_test(
    champion: list[float], challenger: list[float], alpha: float, relative_bar: float = 0.0
) -> NoiseTest:
    """One-sided paired t-test of `champion[i] - challenger[i]` (same seed range i) > 0 at level
    `alpha`, with the bar raised to `relative_bar` (metric units) when that is larger."""
    k = len(champion)
    if k != len(challenger) or k < 2:
        raise ValueError(
            f"a paired test needs k >= 2 scores on each side, got {k} and {len(challenger)}"
        )
    diffs = [a - b for a, b in zip(champion, challenger, strict=True)]
    improvement = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(k)
    df = float(k - 1)
    margin = t_quantile(1.0 - alpha, df)
    threshold = max(margin * se, relative_bar)
    return NoiseTest("paired", improvement, se, df, margin, threshold, improvement > threshold)


def welch_test(
    champion: MetricSample, challenger: MetricSample, alpha: float, relative_bar: float = 0.0
) -> NoiseTest:
    """One-sided Welch t-test on the two means (unpaired: each side's spread counts as noise)."""
    assert champion.std is not None and challenger.std is not None
    v1, v2 = challenger.std**2 / challenger.k, champion.std**2 / champion.k
    se = math.sqrt(v1 + v2)
    if se > 0:
        df = (v1 + v2) ** 2 / (v1**2 / (challenger.k - 1) + v2**2 / (champion.k - 1))
    else:  # every score identical on both sides: no spread to weigh
        df = float(challenger.k + champion.k - 2)
    improvement = champion.mean - challenger.mean
    margin = t_quantile(1.0 - alpha, df)
    threshold = max(margin * se, relative_bar)
    return NoiseTest("welch", improvement, se, df, margin, threshold, improvement > threshold)


@dataclass(frozen=True)
class Candidate:
    """One setting scored on the shared seed ranges: its per-range scores (lower is better) and
    what it costs (e.g. network evaluations per image)."""

    name: str
    values: list[float]
    cost: float = 0.0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)


@dataclass(frozen=True)
class Choice:
    """`best` has the lowest mean; `within_noise` are the candidates a paired test at `alpha`
    cannot call worse than it (best included); `chosen` is the cheapest of those."""

    best: Candidate
    chosen: Candidate
    within_noise: list[Candidate]
    alpha: float


def choose(candidates: list[Candidate], alpha: float) -> Choice:
    """The cheapest candidate within the noise of the best (all scored on the same seed ranges).

    The best of many noisy means is optimistic (the winner's curse): a choice that matters is
    confirmed on fresh seed ranges before it is used."""
    if not candidates:
        raise ValueError("nothing to choose from: no candidates were scored")
    k = {len(c.values) for c in candidates}
    if len(k) != 1:
        raise ValueError(f"candidates were scored on different numbers of seed ranges: {sorted(k)}")
    best = min(candidates, key=lambda c: c.mean)
    if k == {1}:  # no noise measured: only the best is known to be best
        within = [best]
    else:
        within = [
            c
            for c in candidates
            if c is best or not paired_test(c.values, best.values, alpha).promote
        ]
    chosen = min(within, key=lambda c: (c.cost, c.mean))
    return Choice(best=best, chosen=chosen, within_noise=within, alpha=alpha)
