"""The Quickstart's first command as a user runs it: `diffpipe nightly` on embedded defaults
(local store, local Ray, Prefect's ephemeral API), here with a tiny config so it takes ~1 minute."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.e2e.test_nightly_s3 import TINY

pytestmark = pytest.mark.slow


def test_cli_nightly_prints_report_and_fid(tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    store = tmp_path / "artifacts"
    cmd = [
        str(Path(sys.executable).parent / "diffpipe"),
        "nightly",
        f"storage.root={store}",
        *TINY,
        "train.num_workers=1",
        "ray.num_cpus=2",
    ]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = re.search(r"^report: file://(\S+)$", run.stdout, re.M)
    fid = re.search(r"^FID: (\S+) \((.*STAND-IN.*not comparable.*)\)", run.stdout, re.M)
    assert report and fid, run.stdout
    assert Path(report.group(1)).is_file() and float(fid.group(1)) >= 0
    assert "NOT comparable" in Path(report.group(1)).read_text()
