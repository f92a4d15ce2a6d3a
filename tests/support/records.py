"""Stage records made by hand, for the tests of what reads them (promotion, the report) without a
pipeline run: a checkpoint, an evaluation with its noise, and two nights as the stages leave them."""

from __future__ import annotations

import statistics

import numpy as np

from diffusion_core.unet import UNetConfig
from tasks import layout
from tasks.config import ModelConfig, PromoteConfig, SampleConfig
from tasks.promote.stage import promote_if_better
from tasks.records import (
    Checkpoint,
    ExtractorRecord,
    LogWindow,
    Metrics,
    NightlySummary,
    StageTiming,
    TrainHistory,
)
from tasks.report.figures import sample_grid
from tasks.storage import Store, sha256_bytes

NIGHTS = [f"202611{d:02d}T020000Z" for d in range(1, 29)]


def checkpoint_record(
    step: int,
    store: Store | None = None,
    *,
    run_id: str = "r",
    data: bytes | None = None,
    unet: UNetConfig | None = None,
    model: ModelConfig | None = None,
    dataset_fingerprint: str = "x",
) -> Checkpoint:
    """A checkpoint record of `run_id` at `step`. With a `store`, its bytes (`data`, else a
    stand-in "weights <step>") are written there and the record carries their sha256; without
    one it points at nothing (sha256 of zeros)."""
    key = layout.checkpoint(run_id, step)
    sha256 = "0" * 64
    if store is not None:
        data = f"weights {step}".encode() if data is None else data
        store.write_bytes(key, data)
        sha256 = sha256_bytes(data)
    return Checkpoint(
        run_id=run_id,
        step=step,
        key=key,
        sha256=sha256,
        unet=unet or UNetConfig(),
        model=model or ModelConfig(),
        dataset_fingerprint=dataset_fingerprint,
    )


def metrics_record(
    fids: list[float] | float | None,
    *,
    sha: str = "a" * 64,
    steps: int = 50,
    kid: bool = True,
    seed_ranges: list[tuple[int, int]] | None = None,
) -> Metrics:
    """An evaluation with one FID per repeat (a float: one repeat, no noise measured)."""
    values = [fids] if isinstance(fids, float) else (fids or [])
    fid = statistics.fmean(values) if values else None
    ranges = seed_ranges or [(i * 256, (i + 1) * 256) for i in range(max(len(values), 1))]
    return Metrics(
        run_id="r",
        sample_set="step-00000001-ddim-50-abc",
        samples_key="runs/r/samples/x/manifest.json",
        checkpoint_key="runs/r/checkpoints/step-00000001.pt",
        checkpoint_step=1,
        sampling=SampleConfig(steps=steps),
        num_images=256,
        repeats=len(ranges),
        seed_ranges=ranges,
        num_reference_images=180,
        reference_stats_key="stats/x/a-n180.npz",
        dataset_fingerprint="x",
        fid=fid,
        fids=values if len(values) > 1 else [],
        fid_std=statistics.stdev(values) if len(values) > 1 else None,
        kid_mean=fid / 10 if kid and fid is not None else None,
        extractor=ExtractorRecord(label="stand-in", weights_sha256=sha, standard=False, source="t"),
        created="2026-11-25T00:00:00+00:00",
    )


def write_two_nights(store: Store, *, history: bool = True) -> NightlySummary:
    """Two nights of records of run "r" as the stages leave them; returns the second night's
    summary."""
    run = "r"
    rng = np.random.default_rng(0)
    if history:
        windows = [
            LogWindow(
                step=s, loss=1.0 / s, lr=1e-3, images_per_s=300.0, data_wait=0.01, seconds=2.0
            )
            for s in range(10, 610, 10)
        ]
        TrainHistory(run_id=run, windows=windows).write(store, layout.train_history(run))
    cfg = PromoteConfig()
    promote_if_better(
        store,
        cfg,
        metrics_record([0.0903, 0.0921, 0.0885]),
        checkpoint_record(300, store),
        NIGHTS[0],
    )
    metrics = metrics_record([0.0900, 0.0880, 0.0920])
    store.write_bytes(metrics.grid_key, sample_grid(rng.integers(0, 255, (16, 1, 8, 8), np.uint8)))
    ckpt = checkpoint_record(600, store)
    decision = promote_if_better(store, cfg, metrics, ckpt, NIGHTS[1])
    prefix = layout.nightly_prefix(run, NIGHTS[1])
    html_key = layout.nightly_report_html(prefix)
    stages = [
        StageTiming(
            name="shard",
            seconds=0.8,
            reused=True,
            detail="digits: 1617 train / 180 held-out images",
        ),
        StageTiming(name="train", seconds=95.2, reused=False, detail="step 300 -> 600 (300 steps)"),
        StageTiming(name="sample", seconds=31.0, reused=False, detail="768 images, ddim 50 steps"),
        StageTiming(name="evaluate", seconds=40.5, detail="FID ..."),
        StageTiming(name="promote", seconds=0.1, detail="the champion stays"),
    ]
    return NightlySummary(
        run_id=run,
        stamp=NIGHTS[1],
        dataset="digits",
        manifest_key="datasets/digits-0123456789ab/manifest.json",
        shards_reused=True,
        step=600,
        resumed_from=300,
        trained_steps=300,
        checkpoint_key=ckpt.key,
        samples_key=metrics.samples_key,
        metrics=metrics,
        promotion=decision,
        stages=stages,
        report_key=layout.nightly_report(prefix),
        report_html_key=html_key,
        report_url=store.url(html_key),
    )
