"""Promotion, the store's side: the decision of `rule.decide` recorded, the champion replaced,
restored (`--rollback`) or rebuilt from its records (`--repair`).

    models/<name>/current.json       the champion now (its metrics, checkpoint copy, predecessor)
    models/<name>/step-XXXXXXXX.pt   a copy of each promoted checkpoint (training may delete its own)
    models/<name>/step-XXXXXXXX.json that champion's record, kept so a rollback can restore it
    models/<name>/history.json       one decision per night (a rerun of the night replaces it), rollbacks
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from tasks import layout
from tasks.config import PromoteConfig
from tasks.promote.rule import decide
from tasks.records import (
    Champion,
    Checkpoint,
    Metrics,
    PromotionDecision,
    PromotionHistory,
    RecordFormatError,
    Rollback,
)
from tasks.storage import Store

log = logging.getLogger(__name__)


class DamagedChampionError(ValueError):
    """`models/<name>/current.json` cannot be read; `repair` rebuilds it from the records."""


def read_champion(store: Store, model_name: str) -> Champion | None:
    """The champion now, or None when nothing was promoted. A damaged pointer is refused with the
    command that restores it (the nightly checks this before any work)."""
    key = layout.model_current(model_name)
    try:
        return Champion.read_or_none(store, key)
    except RecordFormatError as err:
        if _written_by_another_version(store, key):
            raise  # not damage: its message says to use the version that wrote it
        raise DamagedChampionError(
            f"the champion pointer {store.url(key)} is damaged ({err}); `diffpipe promote "
            "--repair` restores it from the champion records (one kept per promoted model) and "
            "the promotion history; nothing else is lost"
        ) from None


def _written_by_another_version(store: Store, key: str) -> bool:
    try:
        found = store.read_json(key)
    except ValueError:  # not JSON
        return False
    name = found.get("format") if isinstance(found, dict) else None
    family = Champion.expected_format().split("@")[0] + "@"
    return isinstance(name, str) and name.startswith(family) and name != Champion.expected_format()


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
    earlier attempt of the same night promoted the current champion, the challenger is weighed
    against the champion that attempt replaced. A rerun of an older night (a later night's model
    is the champion) that promotes nothing leaves that night's promoting decision in place."""
    night = night or night_now()
    current_key = layout.model_current(cfg.model_name)
    current = read_champion(store, cfg.model_name)
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
    earlier = next((d for d in history.decisions if d.night == night), None)
    if not promote and baseline is current and earlier is not None and earlier.promoted:
        # A rerun of an older night that promotes nothing: that night's promotion stands (its
        # champion is in the chain that rollbacks walk), so does its decision.
        log.info("night %s keeps its earlier promoting decision (this rerun: %s)", night, reason)
    else:
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
    current = read_champion(store, model_name)
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


def repair_champion(store: Store, model_name: str) -> Champion | None:
    """Rebuild `current.json` from the champion records (`diffpipe promote --repair`).

    The champion is the one the latest event put in place: a promoting decision of
    `history.json` or a rollback. Without a readable history it is the head of the records'
    chain (the record no other names as `previous_key`; the latest promoted among several).
    Returns it, or None when no champion record exists (then nothing was promoted)."""
    prefix = layout.model_prefix(model_name)
    records: dict[str, Champion] = {}
    for key in store.list(prefix):
        if layout.is_model_champion(model_name, key):
            try:
                records[key] = Champion.read(store, key)
            except RecordFormatError as err:
                log.warning("champion record %s is damaged, left out: %s", store.url(key), err)
    if not records:
        return None
    chosen = _latest_by_history(store, model_name, records) or _chain_head(records)
    chosen.write(store, layout.model_current(model_name))
    log.info(
        "model %s: champion pointer restored to step %d (%s)", model_name, chosen.step, chosen.key
    )
    return chosen


def _latest_by_history(
    store: Store, model_name: str, records: dict[str, Champion]
) -> Champion | None:
    try:
        history = PromotionHistory.read_or_none(store, layout.model_history(model_name))
    except RecordFormatError as err:
        log.warning("the promotion history is damaged too, using the records' chain: %s", err)
        return None
    if history is None:
        return None
    events = [
        (d.decided_at, 0, layout.model_champion(model_name, d.checkpoint_step))
        for d in history.decisions
        if d.promoted
    ] + [(r.at, 1, r.to_key) for r in history.rollbacks]
    for _, _, key in sorted(events, reverse=True):
        if key in records:
            return records[key]
    return None


def _chain_head(records: dict[str, Champion]) -> Champion:
    named = {c.previous_key for c in records.values()}
    heads = [c for key, c in records.items() if key not in named] or list(records.values())
    return max(heads, key=lambda c: (c.promoted_at, c.step))
