"""report.html as an operator sees it: opened in headless Chromium (Debian's `chromium`, which
.ci/run installs), every image decoded and every section there."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.config import StorageConfig
from tasks.report.stage import SECTIONS, write_nightly_report
from tasks.storage import Store
from tests.support.records import write_two_nights

CHROMIUM = next(
    (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))),
    None,
)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: `apt-get install -y chromium` (.ci/run installs it)",
)
def test_report_html_loads_every_image_and_section_in_chromium(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    summary = write_two_nights(store)
    write_nightly_report(store, summary)
    page = Path(store.path(summary.report_html_key))
    assert summary.report_url == page.as_uri()

    run = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            summary.report_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = run.stdout
    assert run.returncode == 0 and "<body" in dom, run.stderr[-2000:]
    # the page's own script counts the images that decoded (naturalWidth > 0) once it has loaded
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run"
    assert loaded.group(1) == loaded.group(2) == "3", loaded.group(0)
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom, section
    assert "not better by more than the noise" in dom and "standard errors" in dom
    assert "NOT comparable with published FIDs" in dom
