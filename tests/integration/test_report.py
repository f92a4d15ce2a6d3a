"""The nightly report, built from records written straight to a store (no pipeline run): every
section, the metrics with their noise, figures that resolve, the decision with its evidence."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tasks import layout
from tasks.config import PromoteConfig, StorageConfig
from tasks.evaluate.scoring import make_grid
from tasks.promote.stage import promote_if_better
from tasks.records import LogWindow, NightlySummary, StageTiming, TrainHistory
from tasks.report.stage import SECTIONS, write_nightly_report
from tasks.storage import Store
from tasks.webdata import encode_png
from tests.integration.test_promote import NIGHTS, _checkpoint, _metrics

RUN = "r"


def write_two_nights(store: Store, *, history: bool = True) -> NightlySummary:
    """Two nights of records as the stages leave them; returns the second night's summary."""
    rng = np.random.default_rng(0)
    if history:
        windows = [
            LogWindow(
                step=s, loss=1.0 / s, lr=1e-3, images_per_s=300.0, data_wait=0.01, seconds=2.0
            )
            for s in range(10, 610, 10)
        ]
        TrainHistory(run_id=RUN, windows=windows).write(store, layout.train_history(RUN))
    cfg = PromoteConfig()
    promote_if_better(
        store, cfg, _metrics([0.0903, 0.0921, 0.0885]), _checkpoint(store, 300), NIGHTS[0]
    )
    metrics = _metrics([0.0900, 0.0880, 0.0920])
    store.write_bytes(
        metrics.grid_key, encode_png(make_grid(rng.integers(0, 255, (16, 1, 8, 8), np.uint8)))
    )
    ckpt = _checkpoint(store, 600)
    decision = promote_if_better(store, cfg, metrics, ckpt, NIGHTS[1])
    prefix = layout.nightly_prefix(RUN, NIGHTS[1])
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
        run_id=RUN,
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


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(StorageConfig(root=str(tmp_path)))


def test_report_has_every_section_and_images_that_resolve(store: Store, tmp_path: Path) -> None:
    summary = write_two_nights(store)
    write_nightly_report(store, summary)

    md = store.read_bytes(summary.report_key).decode()
    for title in (
        "Metrics and their noise",
        "Samples",
        "Training loss",
        "FID over nights",
        "Promotion decision",
        "Stages",
        "Evaluation settings",
    ):
        assert f"## {title}" in md, title
    # every image the Markdown shows sits beside it (the old report linked a grid elsewhere)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["fid.png", "grid.png", "loss.png"]
    folder = Path(store.path(summary.report_key)).parent
    for link in links:
        assert (folder / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
    assert (folder / "grid.png").read_bytes() == store.read_bytes(summary.metrics.grid_key)
    # the metrics carry their noise, the decision its evidence
    assert "| FID | 0.09000 ± 0.0020 (std over k=3) | 3 | 0.09000, 0.08800, 0.09200 |" in md
    assert "not better by more than the noise" in md and "standard errors" in md
    assert "| train (reused)" not in md and "| shard (reused) | 0.8 s |" in md
    assert "NOT comparable with published FIDs" in md

    page = store.read_bytes(summary.report_html_key).decode()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    # the summary is stored beside the report, and as the run's latest
    assert NightlySummary.read(store, layout.nightly_latest(RUN)) == summary


def test_a_run_without_training_history_still_gets_its_report(store: Store) -> None:
    summary = write_two_nights(store, history=False)
    write_nightly_report(store, summary)
    md = store.read_bytes(summary.report_key).decode()
    assert "_no training history recorded_" in md and "loss.png" not in md
    page = store.read_bytes(summary.report_html_key).decode()
    assert '<p class="missing">no training history recorded</p>' in page
