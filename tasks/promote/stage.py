"""Promotion: the nightly model replaces the promoted one (the champion) only when the two were
evaluated the same way and the challenger is better by more than the measured noise.

    models/<name>/current.json       the champion now (its metrics, checkpoint copy, predecessor)
    models/<name>/step-XXXXXXXX.pt   a copy of each promoted checkpoint (training may delete its own)
    models/<name>/step-XXXXXXXX.json that champion's record, kept so a rollback can restore it
    models/<name>/history.json       one decision per night (a rerun of the night replaces it), rollbacks

The rule (README: Promotion). Lower is better (FID, KID). With `evaluate.repeats = k >= 2` each
evaluation carries k scores of disjoint seed ranges, their mean m and sample standard deviation s.
The challenger is promoted iff

    m_champion - m_challenger > max(t(1 - alpha, df) * se, min_improvement * m_champion)
    se = sqrt(s_challenger^2 / k + s_champion^2 / k),  df the Welch-Satterthwaite degrees of freedom

a one-sided Welch t-test at level `promote.alpha` (default 0.05). With k = 3 each standard deviation
rests on 2 degrees of freedom, so a fixed "2 standard errors" would promote an equally good model
on 5.8% of nights (9.2% at k = 2; simulated) instead of the 2.3% a normal model suggests; the t
quantile (2.1-2.9 standard errors at k = 3) keeps that rate at or below alpha for any k. The two
evaluations share their seeds, which correlates their scores positively; the unpaired test ignores
that, so it errs on the side of keeping the champion. With k = 1 no noise was measured: the challenger is promoted
only past `promote.min_improvement` (a fraction of the champion's value) when that is set, and
otherwise never promoted over a champion; the reason says so.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime

from tasks import layout
from tasks.config import PromoteConfig
from tasks.records import (
    Champion,
    Checkpoint,
    MetricName,
    Metrics,
    MetricSample,
    PromotionDecision,
    PromotionEvidence,
    PromotionHistory,
    Rollback,
)
from tasks.storage import Store

log = logging.getLogger(__name__)


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


def _noise_test(
    challenger: MetricSample,
    champion: MetricSample,
    cfg: PromoteConfig,
    evidence: PromotionEvidence,
) -> tuple[bool, str, PromotionEvidence]:
    """The rule of the module docstring, on two comparable evaluations; fills in `evidence`."""
    improvement = champion.mean - challenger.mean
    relative_bar = (cfg.min_improvement or 0.0) * champion.mean
    evidence = evidence.model_copy(update={"improvement": improvement})
    versus = f"{challenger.describe()} vs promoted {champion.describe()}"
    if challenger.std is None or champion.std is None:
        if cfg.min_improvement is None:
            return (
                False,
                f"noise not measured (evaluate.repeats=1): {versus} cannot be called better; set "
                "evaluate.repeats>=2, or promote.min_improvement to accept a fixed margin",
                evidence,
            )
        promote = improvement > relative_bar
        return (
            promote,
            f"noise not measured (evaluate.repeats=1): {versus}; improvement {improvement:.4g} "
            f"{'>' if promote else '<='} promote.min_improvement {cfg.min_improvement:g} x "
            f"{champion.mean:.4g} = {relative_bar:.4g}",
            evidence.model_copy(update={"threshold": relative_bar}),
        )
    v1, v2 = challenger.std**2 / challenger.k, champion.std**2 / champion.k
    se = math.sqrt(v1 + v2)
    if se > 0:
        df = (v1 + v2) ** 2 / (v1**2 / (challenger.k - 1) + v2**2 / (champion.k - 1))
    else:  # every score identical on both sides: no spread to weigh
        df = float(challenger.k + champion.k - 2)
    from scipy.stats import t as student_t  # imported here: seconds that `diffpipe --help` skips

    margin = float(student_t.ppf(1.0 - cfg.alpha, df))
    threshold = max(margin * se, relative_bar)
    promote = improvement > threshold
    bar = f"{margin:.2f} standard errors of {se:.2g} (Welch t, df {df:.1f}, alpha {cfg.alpha:g})"
    if relative_bar > margin * se:
        bar += f"; promote.min_improvement {cfg.min_improvement:g} asks {relative_bar:.4g}"
    if promote:
        reason = f"better by more than the noise: {versus}; improvement {improvement:.4g} > {threshold:.4g} = {bar}"
    else:
        reason = (
            f"not better by more than the noise: {versus}; improvement {improvement:.4g} <= "
            f"{threshold:.4g} = {bar}"
        )
    return (
        promote,
        reason,
        evidence.model_copy(
            update={"standard_error": se, "df": df, "margin": margin, "threshold": threshold}
        ),
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
        challenger=challenger, alpha=cfg.alpha, min_improvement=cfg.min_improvement
    )
    values = challenger.values or [challenger.mean]
    if not all(math.isfinite(v) for v in [challenger.mean, *values]) or metrics.problems:
        why = "; ".join(metrics.problems) or f"{cfg.metric} is {challenger.mean}"
        return False, f"the evaluation is not trustworthy: {why}", evidence
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
    return _noise_test(challenger, evidence.champion, cfg, evidence)


def night_now() -> str:
    return layout.night_stamp(datetime.now(UTC))


def promote_if_better(
    store: Store,
    cfg: PromoteConfig,
    metrics: Metrics,
    checkpoint: Checkpoint,
    night: str | None = None,
) -> PromotionDecision:
    """Decide, record the decision as night `night`'s (default: now), and promote when better.

    A rerun of a night replaces that night's decision, the champion pointer included: when an
    earlier attempt of the same night promoted a model, the challenger is weighed against the
    champion that attempt replaced."""
    night = night or night_now()
    current_key = layout.model_current(cfg.model_name)
    current = Champion.read_or_none(store, current_key)
    baseline = current
    if current is not None and current.night == night:  # this night's earlier attempt
        baseline = (
            Champion.read(store, current.previous_key) if current.previous_key is not None else None
        )
    promote, reason, evidence = decide(cfg, metrics, checkpoint, baseline)

    now = datetime.now(UTC).isoformat(timespec="seconds")
    promoted_key = None
    if promote:
        promoted_key = layout.model_checkpoint(cfg.model_name, checkpoint.step)
        store.write_bytes(promoted_key, checkpoint.read_bytes(store))  # sha256-checked
        champion = Champion(
            model_name=cfg.model_name,
            step=checkpoint.step,
            checkpoint_key=promoted_key,
            source_checkpoint_key=checkpoint.key,
            metrics=metrics,
            promoted_at=now,
            night=night,
            previous_key=baseline.key if baseline is not None else None,
        )
        champion.write(store, champion.key)  # the record a later rollback restores
        champion.write(store, current_key)  # atomic: readers see the old champion or the new
    elif baseline is not current:  # the night's earlier attempt is undone with its decision
        if baseline is None:
            store.delete(current_key)
        else:
            baseline.write(store, current_key)
    decision = PromotionDecision(
        promoted=promote,
        reason=reason,
        night=night,
        model_name=cfg.model_name,
        metric=cfg.metric,
        value=metrics.value(cfg.metric),
        checkpoint_key=checkpoint.key,
        checkpoint_step=checkpoint.step,
        promoted_key=promoted_key,
        decided_at=now,
        evidence=evidence,
    )
    history_key = layout.model_history(cfg.model_name)
    history = PromotionHistory.read_or_none(store, history_key) or PromotionHistory(decisions=[])
    decisions = sorted(
        [d for d in history.decisions if d.night != night] + [decision], key=lambda d: d.night
    )
    history.model_copy(update={"decisions": decisions}).write(store, history_key)
    log.info(
        "promotion of %s: %s (%s)",
        checkpoint.key,
        "PROMOTED" if promote else "kept the champion",
        reason,
    )
    return decision


class NothingToRollBackError(ValueError):
    """No champion, or a champion without a predecessor."""


def rollback(store: Store, model_name: str) -> Rollback:
    """Put the champion's predecessor back in place (`diffpipe promote --rollback`), and record it."""
    current_key = layout.model_current(model_name)
    current = Champion.read_or_none(store, current_key)
    if current is None:
        raise NothingToRollBackError(
            f"model {model_name!r} has no champion ({store.url(current_key)} does not exist): "
            "nothing to roll back"
        )
    if current.previous_key is None:
        raise NothingToRollBackError(
            f"the champion of model {model_name!r} (step {current.step}, promoted "
            f"{current.promoted_at}) is the first one: there is no previous champion to restore"
        )
    previous = Champion.read(store, current.previous_key)
    if not store.exists(previous.checkpoint_key):
        raise NothingToRollBackError(
            f"the previous champion's checkpoint copy {store.url(previous.checkpoint_key)} is "
            "gone: restore it first (the champion is unchanged)"
        )
    previous.write(store, current_key)
    event = Rollback(
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        from_key=current.key,
        from_step=current.step,
        to_key=previous.key,
        to_step=previous.step,
    )
    history_key = layout.model_history(model_name)
    history = PromotionHistory.read_or_none(store, history_key) or PromotionHistory(decisions=[])
    history.model_copy(update={"rollbacks": [*history.rollbacks, event]}).write(store, history_key)
    log.info(
        "model %s: rolled back from step %d to step %d", model_name, event.from_step, event.to_step
    )
    return event
