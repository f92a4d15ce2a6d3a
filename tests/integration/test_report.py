"""The nightly report, built from records written straight to a store (no pipeline run): every
section, the metrics with their noise, figures that resolve, the decision with its evidence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks import layout
from tasks.config import StorageConfig
from tasks.records import NightlySummary
from tasks.report.stage import SECTIONS, write_nightly_report
from tasks.storage import Store
from tests.support.records import write_two_nights

RUN = "r"  # the run tests.support.records.write_two_nights writes


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
