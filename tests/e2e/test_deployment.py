"""The nightly deployment end to end: a real Prefect server started here, `diffpipe serve`
registering the cron deployment, and `prefect deployment run nightly/nightly --watch` driving a
flow run to Completed, as an operator would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.e2e.test_nightly_s3 import TINY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _exe(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or name


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {url} not healthy after {timeout}s")


def test_deployment_run_completes(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("RAY_ADDRESS", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen(
        [_exe("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(logs / "server.log", "w"),  # noqa: SIM115 (lives as long as the process)
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    serve = None
    try:
        _wait_healthy(api, server)
        store = tmp_path / "artifacts"
        overrides = [f"storage.root={store}", *TINY, "train.num_workers=1", "ray.num_cpus=2"]
        serve = subprocess.Popen(
            [_exe("diffpipe"), "serve", *overrides],
            env=env,
            cwd=REPO,
            stdout=open(logs / "serve.log", "w"),  # noqa: SIM115 (lives as long as the process)
            stderr=subprocess.STDOUT,
        )
        # wait until the deployment is registered
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            ls = subprocess.run(
                [_exe("prefect"), "deployment", "ls"], env=env, capture_output=True, text=True
            )
            if "nightly/nightly" in ls.stdout:
                break
            assert serve.poll() is None, (logs / "serve.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(
                "deployment nightly/nightly never registered:\n"
                + (logs / "serve.log").read_text()[-3000:]
            )

        inspect = subprocess.run(
            [_exe("prefect"), "deployment", "inspect", "nightly/nightly"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert "0 2 * * *" in inspect.stdout  # the nightly cron schedule

        run = subprocess.run(
            [_exe("prefect"), "deployment", "run", "nightly/nightly", "--watch"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        detail = run.stdout[-3000:] + run.stderr[-3000:] + (logs / "serve.log").read_text()[-5000:]
        assert run.returncode == 0, detail
        assert "Completed" in run.stdout, detail
        latest = json.loads((store / "runs" / "nightly" / "nightly" / "latest.json").read_text())
        assert latest["step"] == 20 and (store / latest["report_key"]).is_file()
    finally:
        for proc in (serve, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
