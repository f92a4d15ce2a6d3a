"""The Quickstart's first command as a user runs it: `diffpipe nightly` on embedded defaults
(local store, local Ray, Prefect's ephemeral API), here with a tiny config so it takes ~1 minute."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from tasks import layout
from tests.support.cli import run_cli
from tests.support.config import NIGHTLY, tiny_overrides
from tests.support.paths import REPO

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900, func_only=True)  # a guard: `promote` runs in this process
def test_cli_nightly_prints_report_and_fid(tmp_path, monkeypatch, capsys):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    store = tmp_path / "artifacts"
    cmd = [
        str(Path(sys.executable).parent / "diffpipe"),
        "nightly",
        f"storage.root={store}",
        *tiny_overrides(NIGHTLY),
        "train.workers=1",
        "ray.num_cpus=2",
    ]
    first = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # A second nightly of the same run while the first holds the run's lease: it fails at once,
    # before any work, naming the holder.
    lease = store / layout.lease_object(layout.run_lease_prefix("nightly"))
    deadline = time.monotonic() + 300
    while not lease.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lease.exists(), "the first nightly never took the run's lease"
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr and "run 'nightly'" in second.stderr, second.stderr
    assert first.poll() is None, "the first nightly ended before the second was refused"
    stdout, stderr = first.communicate(timeout=600)
    run = subprocess.CompletedProcess(cmd, first.returncode, stdout, stderr)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    history = json.loads((store / layout.model_history("default")).read_text())
    assert len(history["decisions"]) == 1  # one nightly ran: one decision
    assert not lease.exists()  # released at the end
    # the final summary: what ran and how long it took, the report, FID with its noise, the decision
    for stage in ("shard", "train", "sample", "evaluate", "promote"):
        assert re.search(rf"^  {stage} +\d+\.\d s ", run.stdout, re.M), (stage, run.stdout)
    # and what each stage used, counted where it happened (README: Cost)
    used = re.findall(
        r"^ +CPU (\d+\.\d) s, GPU 0\.0 s, read .+, wrote .+, (\d+) requests", run.stdout, re.M
    )
    assert len(used) >= 5 and all(float(cpu) > 0 for cpu, _ in used[:4]), run.stdout  # promote:
    # a few store requests, under 0.05 s of CPU
    assert sum(int(n) for _, n in used) > 0
    report = re.search(r"^report: file://(\S+/report\.html)$", run.stdout, re.M)
    fid = re.search(
        r"^FID: (\S+) \((noise not measured|std over k=\d+).*STAND-IN.*not comparable.*\)$",
        run.stdout,
        re.M,
    )
    assert report and fid, run.stdout
    assert Path(report.group(1)).is_file() and float(fid.group(1)) >= 0
    assert "NOT comparable" in Path(report.group(1)).read_text()
    assert re.search(r"^promotion: PROMOTED: no model promoted yet; fid ", run.stdout, re.M)
    # Ray's and Prefect's own chatter stays out of the default output
    for noise in ("Started a local Ray instance", "Token authentication", "temporary server"):
        assert noise not in run.stdout + run.stderr, noise
    assert re.search(r"\[2/7\] train done in", run.stderr)  # the stage progress lines

    # the report as Prefect artifacts, read from the ephemeral API's own database in PREFECT_HOME
    with closing(sqlite3.connect(tmp_path / "prefect" / "prefect.db")) as db:
        artifacts = dict(db.execute("SELECT key, data FROM artifact WHERE key LIKE 'nightly-%'"))
    assert set(artifacts) == {
        "nightly-report",
        "nightly-metrics",
        "nightly-stages",
        "nightly-report-html",
        "nightly-progress",
    }
    data = {k: json.loads(v) if isinstance(v, str) else v for k, v in artifacts.items()}
    assert "## Promotion decision" in data["nightly-report"]
    assert json.loads(data["nightly-metrics"])[0]["metric"] == "fid"  # a table is JSON in JSON
    assert data["nightly-progress"] == 100  # every stage done

    # the champion, and a rollback that has nothing to restore after one night; `promote` reads
    # and writes the store only (no Ray, no Prefect), so it runs in this process
    promote = ["promote", f"storage.root={store}"]
    shown = run_cli(promote, monkeypatch, capsys, REPO)
    assert shown.returncode == 0 and "model 'default': step 20 " in shown.stdout, shown
    rollback = run_cli([*promote, "--rollback"], monkeypatch, capsys, REPO)
    assert rollback.returncode == 2 and "no previous champion" in rollback.stderr, rollback

    # A damaged champion pointer: the nightly stops before any work, naming the file and the
    # repair; `--repair` restores it from the champion record, byte for byte.
    current = store / "models" / "default" / "current.json"
    intact = current.read_bytes()
    current.write_bytes(intact[: len(intact) // 2])
    damaged = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert damaged.returncode == 2, damaged
    assert "current.json is damaged" in damaged.stderr and "promote --repair" in damaged.stderr
    assert len(damaged.stderr.strip().splitlines()) == 1, damaged.stderr  # one message, once
    repaired = run_cli([*promote, "--repair"], monkeypatch, capsys, REPO)
    assert repaired.returncode == 0 and "restored to step 20" in repaired.stdout, repaired
    assert json.loads(current.read_bytes()) == json.loads(intact)
