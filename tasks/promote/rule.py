"""The promotion rule, pure: no store, no Ray (README: Promotion).

Lower is better (FID, KID). With `evaluate.repeats = k >= 2` an evaluation scores k disjoint seed
ranges, and champion and challenger are only compared when they used the *same* ranges (and the
same extractor, reference statistics, image count and sampling settings: `incomparable_reasons`).
Their scores are therefore paired: range i is easy or hard for both models alike (on the
Quickstart, one range was 30 % harder than the others for both), and most of the spread between
ranges cancels in the per-range differences

    d_i = champion_i - challenger_i,   i = 1..k.

The challenger is promoted iff

    mean(d) > max(t(1 - alpha, k - 1) * sd(d) / sqrt(k),  min_improvement * mean(champion))

a one-sided paired t-test at level `promote.alpha` (Student 1908; the t quantile, 2.92 standard
errors at k = 3, keeps the false-promotion rate at alpha for any k when the differences are
normal). `benchmarks/promotion_sim.py` shows by simulation that equally good models are promoted at
most alpha of the time and how much more often the paired test finds a real improvement than
Welch's unpaired test, which treated the shared spread as noise (`benchmarks/RESULTS.md`).

Records decided before the paired test (or evaluations without per-range scores) are weighed
with the one-sided Welch test, `welch_test`. With k = 1 no noise was measured: only
`promote.min_improvement` can promote over a champion.

Whatever its score, a model whose memorized share (`tasks.evaluate.neighbours`: samples nearer
the training set than held-out images are) exceeds `promote.max_memorized_share` is refused
(`memorization_refusal`): a model that copies its training images scores a good FID.
"""

from __future__ import annotations

import math

from tasks.compare import paired_test, welch_test
from tasks.config import PromoteConfig
from tasks.records import (
    Champion,
    Checkpoint,
    MetricName,
    Metrics,
    MetricSample,
    PromotionEvidence,
)


def incomparable_reasons(new: Metrics, current: Metrics, metric: MetricName = "fid") -> list[str]:
    """Why two evaluations cannot be compared (empty when they can): the same extractor weights,
    reference statistics, seed ranges, image count, repeats, weights (EMA or raw) and every
    sampling setting that changes the images."""
    reasons = []
    if new.extractor.weights_sha256 != current.extractor.weights_sha256:
        reasons.append("feature extractor weights differ")
    pairs: list[tuple[str, object, object]] = [
        ("reference_stats_key", current.reference_stats_key, new.reference_stats_key),
        ("num_reference_images", current.num_reference_images, new.num_reference_images),
        ("num_images", current.num_images, new.num_images),
        ("repeats", current.repeats, new.repeats),
        ("seed_ranges", current.seed_ranges, new.seed_ranges),
        ("weights", current.weights, new.weights),
    ]
    if metric == "kid":
        pairs.append(("kid_subset_size", current.kid_subset_size, new.kid_subset_size))
    old_settings, new_settings = current.sampling.image_settings(), new.sampling.image_settings()
    pairs += [(f"sample.{name}", old_settings[name], new_settings[name]) for name in new_settings]
    reasons += [f"{name}: {old!r} -> {now!r}" for name, old, now in pairs if old != now]
    return reasons


def _without_noise(
    challenger: MetricSample,
    champion: MetricSample,
    cfg: PromoteConfig,
    evidence: PromotionEvidence,
) -> tuple[bool, str, PromotionEvidence]:
    """k = 1: no noise was measured; only a configured relative margin can promote."""
    improvement = champion.mean - challenger.mean
    versus = f"{challenger.describe()} vs promoted {champion.describe()}"
    evidence = evidence.model_copy(update={"improvement": improvement})
    if cfg.min_improvement is None:
        return (
            False,
            f"noise not measured (evaluate.repeats=1): {versus} cannot be called better; set "
            "evaluate.repeats>=2, or promote.min_improvement to accept a fixed margin",
            evidence,
        )
    relative_bar = cfg.min_improvement * champion.mean
    promote = improvement > relative_bar
    return (
        promote,
        f"noise not measured (evaluate.repeats=1): {versus}; improvement {improvement:.4g} "
        f"{'>' if promote else '<='} promote.min_improvement {cfg.min_improvement:g} x "
        f"{champion.mean:.4g} = {relative_bar:.4g}",
        evidence.model_copy(update={"threshold": relative_bar}),
    )


def _noise_test(
    challenger: MetricSample,
    champion: MetricSample,
    cfg: PromoteConfig,
    evidence: PromotionEvidence,
    num_images: int,
) -> tuple[bool, str, PromotionEvidence]:
    """The rule of the module docstring, on two comparable evaluations; fills in `evidence`."""
    if challenger.std is None or champion.std is None:
        return _without_noise(challenger, champion, cfg, evidence)
    relative_bar = (cfg.min_improvement or 0.0) * champion.mean
    paired = len(challenger.values) == len(champion.values) >= 2
    result = (
        paired_test(champion.values, challenger.values, cfg.alpha, relative_bar)
        if paired
        else welch_test(champion, challenger, cfg.alpha, relative_bar)
    )
    how = (
        f"paired t over the {challenger.k} seed ranges, df {result.df:.0f}"
        if paired
        else f"Welch t, df {result.df:.1f}"
    )
    bar = f"{result.margin:.2f} standard errors of {result.standard_error:.2g} ({how}, alpha {cfg.alpha:g})"
    if relative_bar > result.margin * result.standard_error:
        bar += f"; promote.min_improvement {cfg.min_improvement:g} asks {relative_bar:.4g}"
    detectable = result.threshold / champion.mean if champion.mean > 0 else None
    reach = (
        f"; improvements below {100 * detectable:.2g} % are within the noise at "
        f"k = {challenger.k}, n = {num_images}"
        if detectable is not None
        else ""
    )
    versus = f"{challenger.describe()} vs promoted {champion.describe()}"
    verdict = (
        "better by more than the noise" if result.promote else "not better by more than the noise"
    )
    sign = ">" if result.promote else "<="
    reason = (
        f"{verdict}: {versus}; improvement {result.improvement:.4g} {sign} "
        f"{result.threshold:.4g} = {bar}{reach}"
    )
    return (
        result.promote,
        reason,
        evidence.model_copy(
            update={
                "test": result.test,
                "improvement": result.improvement,
                "standard_error": result.standard_error,
                "df": result.df,
                "margin": result.margin,
                "threshold": result.threshold,
                "detectable": detectable,
            }
        ),
    )


def memorization_refusal(metrics: Metrics, cfg: PromoteConfig) -> str | None:
    """The reason to refuse a model that memorizes, or None (not measured, or within the bar).

    A model that does not memorize scores about `metrics.memorization_quantile` (0.05 by
    default); the default bar, 0.5, refuses only a model that reproduces most of its samples."""
    share = metrics.memorized_share
    if share is None or share <= cfg.max_memorized_share:
        return None
    q = metrics.memorization_quantile or 0.0
    return (
        f"memorization: {share:.1%} of the samples lie nearer the training set than the "
        f"nearest {q:.0%} of held-out images do (a model that does not memorize: about {q:.0%}), "
        f"over promote.max_memorized_share {cfg.max_memorized_share:g}"
    )


def decide(
    cfg: PromoteConfig, metrics: Metrics, checkpoint: Checkpoint, champion: Champion | None
) -> tuple[bool, str, PromotionEvidence]:
    """Whether `metrics` (of `checkpoint`) should replace `champion`, why, and the evidence."""
    challenger = MetricSample.of(metrics, cfg.metric)
    if challenger is None:
        raise ValueError(
            f"promote.metric={cfg.metric!r} but the evaluation has no {cfg.metric}; add it to evaluate.metrics"
        )
    evidence = PromotionEvidence(
        challenger=challenger,
        alpha=cfg.alpha,
        min_improvement=cfg.min_improvement,
        memorized_share=metrics.memorized_share,
        max_memorized_share=cfg.max_memorized_share
        if metrics.memorized_share is not None
        else None,
    )
    values = challenger.values or [challenger.mean]
    if not all(math.isfinite(v) for v in [challenger.mean, *values]) or metrics.problems:
        why = "; ".join(metrics.problems) or f"{cfg.metric} is {challenger.mean}"
        return False, f"the evaluation is not trustworthy: {why}", evidence
    if refusal := memorization_refusal(metrics, cfg):
        return False, refusal, evidence
    if champion is None:
        return True, f"no model promoted yet; {cfg.metric} {challenger.describe()}", evidence
    evidence = evidence.model_copy(
        update={
            "champion": MetricSample.of(champion.metrics, cfg.metric),
            "champion_checkpoint_key": champion.source_checkpoint_key,
        }
    )
    if champion.source_checkpoint_key == checkpoint.key:
        return False, f"already the promoted model (since {champion.promoted_at})", evidence
    if reasons := incomparable_reasons(metrics, champion.metrics, cfg.metric):
        return (
            False,
            "not comparable with the promoted model, evaluated differently ("
            + "; ".join(reasons)
            + ")",
            evidence,
        )
    if evidence.champion is None:
        return True, f"the promoted model has no {cfg.metric}", evidence
    return _noise_test(challenger, evidence.champion, cfg, evidence, metrics.num_images)
