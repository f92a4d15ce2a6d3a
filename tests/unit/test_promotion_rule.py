"""The promotion rule by simulation (benchmarks/promotion_sim.py has the full table): equally good
models are promoted at most alpha of the time, and on correlated seed ranges (as measured) the
paired test finds a real improvement far more often than the unpaired Welch test."""

from __future__ import annotations

import math

import pytest

from benchmarks.promotion_sim import RHO_MEASURED, promotion_rates
from tasks.compare import Candidate, choose, paired_test

ALPHA, TRIALS = 0.05, 2000
# Three binomial standard errors above alpha: a rate this high would be a real excess.
TOLERANCE = 3 * math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)


@pytest.mark.parametrize("rho", [0.0, RHO_MEASURED])
@pytest.mark.parametrize("k", [2, 3])
def test_equally_good_models_are_promoted_at_most_alpha_of_the_time(rho, k):
    paired, welch = promotion_rates(rho, k, 0.0, TRIALS, ALPHA, seed=k)
    assert paired <= ALPHA + TOLERANCE
    assert welch <= ALPHA + TOLERANCE


def test_the_paired_test_has_more_power_on_correlated_ranges():
    paired, welch = promotion_rates(RHO_MEASURED, 3, 0.10, TRIALS, ALPHA, seed=7)
    assert paired > 2 * welch and paired > 0.4


def test_a_paired_test_needs_two_scores_a_side():
    with pytest.raises(ValueError, match="k >= 2"):
        paired_test([0.1], [0.09], ALPHA)
    with pytest.raises(ValueError, match="k >= 2"):
        paired_test([0.1, 0.2], [0.09], ALPHA)


def test_identical_differences_promote_only_a_real_improvement():
    assert paired_test([0.2, 0.3], [0.1, 0.2], ALPHA).promote  # 0.1 better on every range
    assert not paired_test([0.2, 0.3], [0.2, 0.3], ALPHA).promote  # the same scores


def test_the_cheapest_setting_within_the_noise_of_the_best_is_chosen():
    # Range 2 is hard for every setting (shared seeds); 20 steps is no worse than 50 by more than
    # the noise, 10 steps is worse on every range.
    grid = [
        Candidate("ddim-50", [0.100, 0.130, 0.101], cost=50),
        Candidate("ddim-20", [0.102, 0.131, 0.100], cost=20),
        Candidate("ddim-10", [0.150, 0.180, 0.152], cost=10),
    ]
    choice = choose(grid, ALPHA)
    assert choice.best.name == "ddim-50"
    assert [c.name for c in choice.within_noise] == ["ddim-50", "ddim-20"]
    assert choice.chosen.name == "ddim-20"


def test_choose_refuses_what_cannot_be_compared():
    with pytest.raises(ValueError, match="nothing to choose"):
        choose([], ALPHA)
    with pytest.raises(ValueError, match="different numbers of seed ranges"):
        choose([Candidate("a", [0.1, 0.2]), Candidate("b", [0.1])], ALPHA)
    single = choose([Candidate("a", [0.2], cost=1), Candidate("b", [0.1], cost=50)], ALPHA)
    assert single.chosen.name == "b"  # k = 1: no noise measured, only the best is known
