"""Promotion: the nightly model replaces the promoted one only when its metric is better and the two
evaluations are comparable (same extractor weights, same reference statistics, same sampling setup).

    models/<name>/current.json       what is promoted now (metrics, checkpoint, when)
    models/<name>/step-XXXXXXXX.pt   a copy of the promoted checkpoint (training may delete its own)
    models/<name>/history.json       every decision, promoted or not, newest last
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from tasks.config import PromoteConfig
from tasks.storage import Store

log = logging.getLogger(__name__)

# Settings that must agree for two metric values to be compared at all.
COMPARABLE_KEYS = ("reference_stats_key", "num_images", "sampler", "steps", "eta", "guidance_scale")
METRIC_FIELD = {"fid": "fid", "kid": "kid_mean"}


def model_prefix(name: str) -> str:
    return f"models/{name}"


def incomparable_reasons(new: dict[str, Any], current: dict[str, Any]) -> list[str]:
    reasons = []
    if new["extractor"]["weights_sha256"] != current["extractor"]["weights_sha256"]:
        reasons.append("feature extractor weights differ")
    for key in COMPARABLE_KEYS:
        if new.get(key) != current.get(key):
            reasons.append(f"{key}: {current.get(key)!r} -> {new.get(key)!r}")
    return reasons


def promote_if_better(
    store: Store, cfg: PromoteConfig, metrics: dict[str, Any], checkpoint_key: str
) -> dict[str, Any]:
    """Decide, record the decision in history, and promote when better. Returns the decision."""
    prefix = model_prefix(cfg.model_name)
    field = METRIC_FIELD[cfg.metric]
    if field not in metrics:
        raise ValueError(
            f"promote.metric={cfg.metric!r} but the evaluation has no {field!r}; add it to evaluate.metrics"
        )
    current = store.read_json_or_none(f"{prefix}/current.json")
    value = float(metrics[field])
    if current is None:
        promote, reason = True, "no model promoted yet"
    elif reasons := incomparable_reasons(metrics, current["metrics"]):
        promote, reason = (
            False,
            "not comparable with the promoted model (" + "; ".join(reasons) + ")",
        )
    elif value < float(current["metrics"][field]):
        promote, reason = (
            True,
            f"{cfg.metric} {value:.4f} < promoted {float(current['metrics'][field]):.4f}",
        )
    else:
        promote, reason = (
            False,
            f"{cfg.metric} {value:.4f} is not better than promoted {float(current['metrics'][field]):.4f}",
        )

    now = datetime.now(UTC).isoformat(timespec="seconds")
    decision = {
        "promoted": promote,
        "reason": reason,
        "metric": cfg.metric,
        "value": value,
        "checkpoint_key": checkpoint_key,
        "decided_at": now,
        "model_name": cfg.model_name,
    }
    if promote:
        copy_key = f"{prefix}/{checkpoint_key.rsplit('/', 1)[-1]}"
        store.write_bytes(copy_key, store.read_bytes(checkpoint_key))
        store.write_json(
            f"{prefix}/current.json",
            {
                "checkpoint_key": copy_key,
                "source_checkpoint_key": checkpoint_key,
                "metrics": metrics,
                "promoted_at": now,
            },
        )
        decision["promoted_key"] = copy_key
    history = store.read_json_or_none(f"{prefix}/history.json") or []
    store.write_json(f"{prefix}/history.json", [*history, decision])
    log.info(
        "promotion of %s: %s (%s)",
        checkpoint_key,
        "PROMOTED" if promote else "kept current",
        reason,
    )
    return decision
