"""Retention, the store's side: survey the store (one listing and the records that say what is in
use), plan with the pure rule (`rule.plan`), and apply the plan: the pruned nights' report text
first, then the deletions. `diffpipe gc --dry-run` prints a plan; `diffpipe gc` and the nightly's
last stage apply one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from tasks import layout
from tasks.config import RetentionConfig
from tasks.records import Champion, Checkpoint, DatasetManifest, NightlySummary
from tasks.report.document import html_without_images, markdown_without_images
from tasks.retention.rule import RetentionPlan, Survey, names_below, plan, pruned_note, valid_part
from tasks.storage import Store

log = logging.getLogger(__name__)


def survey(store: Store) -> Survey:
    """The whole store's listing and every record retention weighs. A damaged champion or record
    stops it (with the record's own message): nothing is deleted on a guess."""
    objects = store.walk()
    keys = {o.key for o in objects}
    nights: list[NightlySummary] = []
    latest: dict[str, Checkpoint] = {}
    for run_id in names_below(layout.runs_root(), objects):
        for stamp in names_below(layout.nightlies_prefix(run_id), objects):
            key = layout.nightly_summary(layout.nightly_prefix(run_id, stamp))
            if key in keys:
                nights.append(NightlySummary.read(store, key))
        if layout.latest_checkpoint(run_id) in keys:
            latest[run_id] = Checkpoint.read(store, layout.latest_checkpoint(run_id))
    manifests = []
    for folder in names_below(layout.datasets_root(), objects):
        name, _, shard_set = folder.rpartition("-")  # `layout.dataset_prefix`'s two parts
        if not (valid_part(name) and valid_part(shard_set)):
            continue
        key = layout.dataset_manifest(layout.dataset_prefix(name, shard_set))
        if key in keys:
            manifests.append(DatasetManifest.read(store, key))
    champions: dict[str, Champion] = {}
    current: dict[str, Champion] = {}
    for model in names_below(layout.models_root(), objects):
        for key in sorted(keys):
            if layout.is_model_champion(model, key):
                champions[key] = Champion.read(store, key)
        if layout.model_current(model) in keys:
            current[model] = Champion.read(store, layout.model_current(model))
    # Only a local store's writes leave temporaries (S3's are uncommitted uploads): a second
    # listing of a bucket would find nothing.
    unfinished = store.walk(unfinished=True) if store.is_local else []
    return Survey(objects, nights, manifests, latest, champions, current, unfinished)


def plan_retention(
    store: Store, policy: RetentionConfig, keep_checkpoints: int, now: datetime | None = None
) -> RetentionPlan:
    """What retention would delete from `store` now (`diffpipe gc --dry-run`)."""
    return plan(survey(store), policy, keep_checkpoints, now or datetime.now(UTC))


def apply_retention(
    store: Store, planned: RetentionPlan, policy: RetentionConfig, now: datetime | None = None
) -> None:
    """Rewrite each pruned night's report to say its images were pruned, then delete exactly
    what was planned. Safe to interrupt and repeat: a rewritten report reads right before and
    after its images go, and a sample set's manifest goes last."""
    note = pruned_note(now or datetime.now(UTC), policy.keep_nights)
    for night in planned.pruned_reports:
        for key, prune in (
            (night.report_key, markdown_without_images),
            (night.report_html_key, html_without_images),
        ):
            if store.exists(key):
                store.write_text(key, prune(store.read_bytes(key).decode(), note))
    for deletion in planned.deletions:
        store.delete(deletion.key)
    log.info("retention freed %s", planned.describe())
