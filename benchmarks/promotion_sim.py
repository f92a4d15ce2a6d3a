"""How often the promotion rule promotes, by simulation: the paired t-test the product uses
(`tasks.promote.rule.paired_test`) against the unpaired Welch test it replaced (`welch_test`).

Each simulated night scores champion and challenger on the same k seed ranges. A range's score is

    score[model, i] = mean[model] + sigma * (sqrt(rho) * z[i] + sqrt(1 - rho) * e[model, i])

z[i] is shared by both models (an easy or hard seed range), e independent, both standard normal.
rho is the correlation of the two models' scores on one range. Measured on the Quickstart's two
nights (issue 17: champion 0.1015 / 0.1308 / 0.1005, challenger 0.0854 / 0.1055 / 0.0868):
sigma ~ 0.0144 (the per-range spread at a mean of 0.1), rho ~ 0.91.

    python -m benchmarks.promotion_sim [--trials 10000] [--out benchmarks/results/promotion_sim.md]

Prints one table: for each (rho, k, true improvement in % of the mean) the share of nights each
test promotes. At 0 % improvement that share is the false-promotion rate (the goal: <= alpha).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.compare import paired_test, welch_test
from tasks.records import MetricSample
from tasks.runtime import setup_process

MEAN, SIGMA, RHO_MEASURED = 0.1, 0.0144, 0.91
QUICKSTART = ([0.1015, 0.1308, 0.1005], [0.0854, 0.1055, 0.0868])


@dataclass(frozen=True)
class Cell:
    rho: float
    k: int
    improvement: float  # fraction of MEAN
    paired: float  # share of nights promoted
    welch: float


def _sample(values: np.ndarray) -> MetricSample:
    v = [float(x) for x in values]
    return MetricSample(
        mean=float(np.mean(values)), std=float(np.std(values, ddof=1)), k=len(v), values=v
    )


def promotion_rates(
    rho: float, k: int, improvement: float, trials: int, alpha: float, seed: int
) -> tuple[float, float]:
    """The share of `trials` simulated nights that the paired and the Welch test promote."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((trials, k))
    own = rng.standard_normal((trials, 2, k))
    scores = SIGMA * (math.sqrt(rho) * shared[:, None, :] + math.sqrt(1 - rho) * own)
    champion = MEAN + scores[:, 0]
    challenger = MEAN * (1 - improvement) + scores[:, 1]
    paired = welch = 0
    for a, b in zip(champion, challenger, strict=True):
        paired += paired_test([float(x) for x in a], [float(x) for x in b], alpha).promote
        welch += welch_test(_sample(a), _sample(b), alpha).promote
    return paired / trials, welch / trials


def table(trials: int, alpha: float) -> list[Cell]:
    cells = []
    for rho in (0.0, 0.5, RHO_MEASURED):
        for k in (2, 3, 5):
            for improvement in (0.0, 0.05, 0.10, 0.17):
                seed = hash((round(rho * 100), k, round(improvement * 100))) % 2**32
                p, w = promotion_rates(rho, k, improvement, trials, alpha, seed)
                cells.append(Cell(rho, k, improvement, p, w))
    return cells


def render(cells: list[Cell], trials: int, alpha: float) -> str:
    champion, challenger = QUICKSTART
    paired = paired_test(champion, challenger, alpha)
    welch = welch_test(_sample(np.array(champion)), _sample(np.array(challenger)), alpha)
    lines = [
        f"Promotion by simulation: {trials} nights a cell, alpha {alpha}, per-range sigma {SIGMA} "
        f"at mean {MEAN}.",
        "",
        "| rho | k | true improvement | paired t: promoted | Welch: promoted |",
        "|---|---|---|---|---|",
    ]
    for c in cells:
        what = "(false promotions)" if c.improvement == 0 else ""
        lines.append(
            f"| {c.rho:g} | {c.k} | {100 * c.improvement:.0f} % {what} | {100 * c.paired:.1f} % "
            f"| {100 * c.welch:.1f} % |"
        )
    lines += [
        "",
        f"The Quickstart's two nights: paired improvement {paired.improvement:.4f} vs bar "
        f"{paired.threshold:.4f} -> {'PROMOTED' if paired.promote else 'kept'}; Welch bar "
        f"{welch.threshold:.4f} -> {'PROMOTED' if welch.promote else 'kept'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    setup_process()
    text = render(table(args.trials, args.alpha), args.trials, args.alpha)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
