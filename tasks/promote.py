"""Promotion: the nightly model replaces the promoted one only when its metric is better and the two
evaluations are comparable (same extractor weights, same reference statistics, same sampling setup).

    models/<name>/current.json       what is promoted now (metrics, checkpoint, when)
    models/<name>/step-XXXXXXXX.pt   a copy of the promoted checkpoint (training may delete its own)
    models/<name>/history.json       every decision, promoted or not, newest last
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime

from tasks import layout
from tasks.config import PromoteConfig
from tasks.records import Champion, Checkpoint, Metrics, PromotionDecision, PromotionHistory
from tasks.storage import Store

log = logging.getLogger(__name__)


def incomparable_reasons(new: Metrics, current: Metrics) -> list[str]:
    """Why two evaluations cannot be compared (empty when they can): the extractor weights, the
    reference statistics and every sampling setting that changes the images must agree."""
    reasons = []
    if new.extractor.weights_sha256 != current.extractor.weights_sha256:
        reasons.append("feature extractor weights differ")
    if new.reference_stats_key != current.reference_stats_key:
        reasons.append(
            f"reference_stats_key: {current.reference_stats_key!r} -> {new.reference_stats_key!r}"
        )
    old_settings, new_settings = current.sampling.image_settings(), new.sampling.image_settings()
    for name, value in new_settings.items():
        if old_settings[name] != value:
            reasons.append(f"{name}: {old_settings[name]!r} -> {value!r}")
    return reasons


def promote_if_better(
    store: Store, cfg: PromoteConfig, metrics: Metrics, checkpoint: Checkpoint
) -> PromotionDecision:
    """Decide, record the decision in history, and promote when better. Returns the decision."""
    value = metrics.value(cfg.metric)
    if value is None:
        raise ValueError(
            f"promote.metric={cfg.metric!r} but the evaluation has no {cfg.metric}; add it to evaluate.metrics"
        )
    current = Champion.read_or_none(store, layout.model_current(cfg.model_name))
    current_value = current.metrics.value(cfg.metric) if current else None
    if not math.isfinite(value) or metrics.problems:
        why = "; ".join(metrics.problems) or f"{cfg.metric} is {value}"
        promote, reason = False, f"the evaluation is not trustworthy: {why}"
    elif current is None:
        promote, reason = True, "no model promoted yet"
    elif reasons := incomparable_reasons(metrics, current.metrics):
        promote, reason = (
            False,
            "not comparable with the promoted model (" + "; ".join(reasons) + ")",
        )
    elif current_value is None or value < current_value:
        promote, reason = True, f"{cfg.metric} {value:.4f} < promoted {current_value:.4f}"
    else:
        promote, reason = (
            False,
            f"{cfg.metric} {value:.4f} is not better than promoted {current_value:.4f}",
        )

    now = datetime.now(UTC).isoformat(timespec="seconds")
    promoted_key = None
    if promote:
        promoted_key = layout.model_checkpoint(cfg.model_name, checkpoint.step)
        store.write_bytes(promoted_key, checkpoint.read_bytes(store))  # sha256-checked
        Champion(
            checkpoint_key=promoted_key,
            source_checkpoint_key=checkpoint.key,
            metrics=metrics,
            promoted_at=now,
        ).write(store, layout.model_current(cfg.model_name))
    decision = PromotionDecision(
        promoted=promote,
        reason=reason,
        model_name=cfg.model_name,
        metric=cfg.metric,
        value=value,
        checkpoint_key=checkpoint.key,
        checkpoint_step=checkpoint.step,
        promoted_key=promoted_key,
        decided_at=now,
    )
    history_key = layout.model_history(cfg.model_name)
    history = PromotionHistory.read_or_none(store, history_key)
    PromotionHistory(decisions=[*(history.decisions if history else []), decision]).write(
        store, history_key
    )
    log.info(
        "promotion of %s: %s (%s)",
        checkpoint.key,
        "PROMOTED" if promote else "kept current",
        reason,
    )
    return decision
