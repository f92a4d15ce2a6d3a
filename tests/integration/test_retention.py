"""Retention over a dozen nights on a real store: each night leaves what the stages leave (a
checkpoint, a sample set with its features, an evaluation, a promotion decision, the nightly
report), then the nightly's retention stage runs. Real shards, promotion, reports and retention;
the model's numbers are made by hand (tests/support/records.py), so a night costs milliseconds
instead of a training run."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from flows.stages import retention_task
from tasks import layout
from tasks.config import DataConfig, PromoteConfig, RetentionConfig, StorageConfig, TrainConfig
from tasks.promote.stage import promote_if_better
from tasks.records import (
    Champion,
    DatasetManifest,
    LogWindow,
    NightlySummary,
    StageTiming,
    TrainHistory,
)
from tasks.report import evaluation
from tasks.report.document import render_markdown
from tasks.report.figures import sample_grid
from tasks.report.stage import write_nightly_report
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.loop import prune_checkpoints
from tests.support.cli import run_cli
from tests.support.records import NIGHTS, checkpoint_record, metrics_record

RUN, SHA = "nightly", "a" * 64
POLICY = RetentionConfig(keep_nights=3, grace_hours=0, rollback_depth=2)
TRAIN = TrainConfig(run_id=RUN, keep_checkpoints=3)
# Each night's FID (three seed ranges around it): the odd nights beat the champion, so nights
# 1, 3, ..., 11 promote and the rollback chain grows to six champions.
FIDS = [1.0, 1.1, 0.9, 0.95, 0.8, 0.85, 0.7, 0.75, 0.6, 0.65, 0.5, 0.55]
PRUNED = "pruned by retention"


def _night(store: Store, i: int, manifest: DatasetManifest) -> NightlySummary:
    """Night i (1-based) as the stages leave it: train to step 10 i, sample, evaluate, promote,
    report."""
    step, stamp, rng = 10 * i, NIGHTS[i], np.random.default_rng(i)
    fp = manifest.fingerprint
    ckpt = checkpoint_record(
        step, store, run_id=RUN, data=rng.bytes(20_000), dataset_fingerprint=fp
    )
    ckpt.write(store, layout.latest_checkpoint(RUN))
    prune_checkpoints(store, TRAIN)
    windows = [
        LogWindow(step=s, loss=1 / s, lr=1e-3, images_per_s=1.0, data_wait=0.0, seconds=1.0)
        for s in range(10, step + 1, 5)
    ]
    TrainHistory(run_id=RUN, windows=windows).write(store, layout.train_history(RUN))

    name = layout.sample_set_name(step, "ddim", 2, "abcdef0123")
    samples = layout.sample_set_prefix(RUN, name)
    for key, size in (
        (layout.sample_weights(samples), 20_000),
        (layout.sample_shard(samples, 0), 30_000),
        (layout.sample_features(samples, SHA, 0), 10_000),
    ):
        store.write_bytes(key, rng.bytes(size))
    store.write_json(layout.sample_receipt(samples, 0), {"shard": 0})
    store.write_json(layout.sample_manifest(samples), {"set": name})

    fid = FIDS[i - 1]
    metrics = metrics_record([fid, fid * 1.02, fid * 0.98]).model_copy(
        update={
            "run_id": RUN,
            "sample_set": name,
            "samples_key": layout.sample_manifest(samples),
            "checkpoint_key": ckpt.key,
            "checkpoint_step": step,
            "dataset_fingerprint": fp,
            "reference_stats_key": layout.reference_stats(fp, SHA, 180),
        }
    )
    store.write_bytes(metrics.reference_stats_key or "", rng.bytes(5_000))
    grid = sample_grid(rng.integers(0, 255, (16, 1, 8, 8), np.uint8))
    metrics.write(store, metrics.key)
    store.write_bytes(metrics.grid_key, grid)
    store.write_text(metrics.report_key, render_markdown(evaluation.document(metrics, grid)))

    decision = promote_if_better(store, PromoteConfig(), metrics, ckpt, stamp)
    prefix = layout.nightly_prefix(RUN, stamp)
    html_key = layout.nightly_report_html(prefix)
    summary = NightlySummary(
        run_id=RUN,
        stamp=stamp,
        dataset=manifest.dataset,
        manifest_key=manifest.key,
        shards_reused=i > 1,
        step=step,
        resumed_from=step - 10 or None,
        trained_steps=10,
        checkpoint_key=ckpt.key,
        samples_key=metrics.samples_key,
        metrics=metrics,
        promotion=decision,
        stages=[StageTiming(name="train", seconds=1.0, detail=f"step {step - 10} -> {step}")],
        report_key=layout.nightly_report(prefix),
        report_html_key=html_key,
        report_url=store.url(html_key),
    )
    write_nightly_report(store, summary)
    return summary


def _keys(store: Store) -> dict[str, int]:
    return {o.key: o.bytes for o in store.walk()}


def _check_reports(store: Store, summaries: list[NightlySummary]) -> int:
    """Every report shows its images or says they were pruned; returns how many say so."""
    pruned = 0
    for s in summaries:
        md = store.read_bytes(s.report_key).decode()
        page = store.read_bytes(s.report_html_key).decode()
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
        images = re.findall(r'<img id="([a-z]+)"', page)
        if PRUNED in md:
            assert links == [] and images == [] and PRUNED in page, s.stamp
            pruned += 1
        else:
            assert links and sorted(f"{i}.png" for i in images) == sorted(links), s.stamp
            folder = layout.nightly_prefix(s.run_id, s.stamp)
            for link in links:  # beside the report: `<folder>/<figure>.png`
                figure = link.removesuffix(".png")
                assert store.exists(layout.nightly_figure(folder, figure)), (s.stamp, link)  # type: ignore[arg-type]
    return pruned


def _chain(store: Store) -> list[Champion]:
    chain = [Champion.read(store, layout.model_current("default"))]
    while chain[-1].previous_key and store.exists(chain[-1].previous_key):
        chain.append(Champion.read(store, chain[-1].previous_key))
    return chain


def test_a_dozen_nights_keep_the_store_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = StorageConfig(root=str(tmp_path / "store"))
    store = Store(storage)
    manifest = shard_dataset(
        DataConfig(max_images=80, samples_per_shard=40, workers=0), store
    ).manifest
    orphan = layout.dataset_shard(manifest.prefix, "train", "f" * 16)  # a source that changed
    unused = layout.reference_stats("old-dataset", SHA, 180)
    store.write_bytes(orphan, b"old shard")
    store.write_bytes(unused, b"old statistics")

    summaries, sizes = [], []
    for i in range(1, len(FIDS) + 1):
        summaries.append(_night(store, i, manifest))
        detail = retention_task.fn(POLICY, TRAIN, storage)
        keys = _keys(store)
        sizes.append(sum(keys.values()))
        if i == 1:
            assert "1 dataset shard" in detail and "1 dataset's reference statistics" in detail
            assert orphan not in keys and unused not in keys
        if i > POLICY.keep_nights:
            assert "1 sample set" in detail and "1 night's report images" in detail, detail
        # the last keep_nights nights keep their samples, features and evaluation; no other does
        for j, s in enumerate(summaries, start=1):
            kept = j > i - POLICY.keep_nights
            assert (s.samples_key in keys) is kept, (i, j)
            assert (s.metrics.key in keys) is kept, (i, j)
        assert _check_reports(store, summaries) == max(i - POLICY.keep_nights, 0)
        # the champion and rollback_depth predecessors keep their checkpoint copies
        chain = _chain(store)
        assert all(c.checkpoint_key in keys for c in chain[: POLICY.rollback_depth + 1])
        assert len([k for k in keys if k.startswith(layout.checkpoints_prefix(RUN))]) <= 4
        assert all(s.key in keys for split in manifest.splits.values() for s in split.shards)

    assert [c.step for c in _chain(store)] == [110, 90, 70, 50, 30, 10]
    # bounded: after the first keep_nights nights, each night adds its report's text only
    grown = sizes[-1] - sizes[POLICY.keep_nights]
    per_night = sizes[1] - sizes[0]
    assert grown < per_night, (sizes, grown, per_night)

    # gc --dry-run lists exactly what gc then deletes (a tighter policy, by overrides)
    args = [
        f"storage.root={storage.root}",
        "retention.keep_nights=1",
        "retention.grace_hours=0",
        "retention.rollback_depth=2",
    ]
    # a write killed before its rename left its temporary file, which no reader sees
    unfinished = f"{layout.run_prefix(RUN)}/.tmp-history.json-0123abcd"
    (Path(storage.root) / unfinished).write_bytes(b'{"windows": [')
    before = _keys(store)
    dry = run_cli(["gc", "--dry-run", *args], monkeypatch, capsys)
    assert dry.returncode == 0, dry.stderr
    listed = re.findall(r"^ +\d+(?:\.\d)? [kMGT]?B  (\S+)$", dry.stdout, re.M)
    assert listed and "would delete" in dry.stdout and _keys(store) == before
    assert unfinished in listed and "1 unfinished write" in dry.stdout
    run = run_cli(["gc", *args], monkeypatch, capsys)
    assert run.returncode == 0, run.stderr
    assert not (Path(storage.root) / unfinished).exists()
    assert sorted(set(before) - set(_keys(store))) == sorted(set(listed) - {unfinished})
    assert set(_keys(store)) <= set(before)
    assert _check_reports(store, summaries) == len(FIDS) - 1
    assert run_cli(["gc", "--dry-run", *args], monkeypatch, capsys).stdout.count("B  ") == 0

    # promote --rollback goes back rollback_depth champions, then says the copy is gone
    for step in (90, 70):
        back = run_cli(
            ["promote", "--rollback", f"storage.root={storage.root}"], monkeypatch, capsys
        )
        assert back.returncode == 0 and f"to step {step}" in back.stdout, back
    refused = run_cli(
        ["promote", "--rollback", f"storage.root={storage.root}"], monkeypatch, capsys
    )
    assert refused.returncode == 2 and "is gone" in refused.stderr, refused


def test_the_listing_retention_reads_on_the_s3_test_server(s3_storage: StorageConfig) -> None:
    """`Store.walk` on S3: every object at any depth, its size and when it was written."""
    store = Store(s3_storage)
    started = datetime.now(UTC) - timedelta(seconds=5)  # the server's clock is this machine's
    keys = {layout.run_config(RUN): b"{}", layout.checkpoint(RUN, 10): b"x" * 1000}
    for key, data in keys.items():
        store.write_bytes(key, data)
    listed = store.walk()
    assert [(o.key, o.bytes) for o in listed] == sorted((k, len(v)) for k, v in keys.items())
    assert all(o.written.tzinfo is not None and o.written >= started for o in listed)
    assert [o.key for o in store.walk(layout.checkpoints_prefix(RUN))] == [
        layout.checkpoint(RUN, 10)
    ]
    assert store.walk(layout.models_root()) == []
