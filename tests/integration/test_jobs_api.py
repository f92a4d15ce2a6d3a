"""The nightly submitted through Ray's Jobs API, as the README shows it and KubeRay's RayJob runs it:
a real Ray head (`ray start`, with the dashboard that serves the Jobs API, on loopback) with token
authentication, the README's `ray job submit` command run verbatim, and the job followed until it
succeeds. The driver runs on the head, where Ray sets RAY_ADDRESS for it, and ships our packages
to the cluster's workers as `py_modules`, merged with the job's own runtime_env."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tasks.config import to_yaml
from tasks.ray_runtime import cluster_runtime_env
from tests.support.config import SHORT_NIGHT, tiny_config
from tests.support.paths import REPO
from tests.support.procs import below
from tests.support.s3 import free_port, wait_for_port

BIN = Path(sys.executable).parent


def readme_submission() -> str:
    """The command of the README's "Submitting with the Jobs API" that starts with `ray job
    submit`, exactly as written there."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Submitting with the Jobs API", 1)[1].split("\n#", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [b.strip() for b in blocks if b.startswith("ray job submit")]
    assert len(commands) == 1, f"one `ray job submit` block expected in the section, got {blocks}"
    return commands[0]


def test_the_runtime_env_is_plain_data_that_a_job_can_merge():
    """Ray deep-copies a driver's runtime_env to merge it with its job's: module objects fail
    there ("cannot pickle 'module' object"); package directories do not."""
    env = cluster_runtime_env()
    assert copy.deepcopy(env) == env and json.loads(json.dumps(env)) == env
    assert [Path(p).name for p in env["py_modules"]] == ["diffusion_core", "tasks"]
    assert all((Path(p) / "__init__.py").is_file() for p in env["py_modules"])


def test_the_rayjob_entrypoint_is_the_readme_command():
    rayjob = yaml.safe_load((REPO / "infra" / "k8s" / "rayjob.yaml").read_text())
    entrypoint = readme_submission().split(" -- ", 1)[1]
    image_config = entrypoint.replace('"$NIGHTLY_CONFIG"', "/app/configs/nightly-cluster.yaml")
    assert rayjob["spec"]["entrypoint"] == image_config


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGSTOP the whole tree first (so that nothing in it starts another process), then SIGKILL
    every process of it."""
    pids = [proc.pid, *below(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    for pid in {*pids, *below(proc.pid)}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_the_readme_submission_runs_the_nightly_as_a_job(s3_storage):
    pytest.importorskip("aiohttp_cors", reason="the Jobs API needs the `cluster` extra")
    temp = Path(tempfile.mkdtemp(prefix="dpj-", dir="/tmp"))  # Ray's socket paths stay short
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_API_URL"))}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "PREFECT_HOME": str(temp / "prefect"),  # the job's driver starts Prefect's ephemeral API
    }
    # The head's own environment is what the job's driver and the workers get: the storage
    # credentials included (the S3 test server's dummies), as a cluster node has its own.
    gcs, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={temp / 'ray'}",
            "--disable-usage-stats",
        ],
        cwd=temp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(dashboard, timeout=120)
        api = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60  # the port opens before the routes answer
        while _http_status(f"{api}/api/version") >= 500 and time.monotonic() < deadline:
            time.sleep(1)
        assert _http_status(f"{api}/api/jobs/") in (401, 403), "the Jobs API let us in untokened"

        cfg = tiny_config(s3_storage, SHORT_NIGHT)
        config = temp / "nightly.yaml"
        config.write_text(to_yaml(cfg))
        submitter = env | {
            "RAY_API_SERVER_ADDRESS": api,
            "NIGHTLY_CONFIG": str(config),
        }
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", readme_submission()],
            cwd=temp,
            env=submitter,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        _kill_tree(head)
        shutil.rmtree(temp, ignore_errors=True)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-6000:]
    assert "cannot pickle" not in out
    # the driver's summary, printed on the head and shown by `ray job submit` as the job ran
    assert re.search(r"^  train +\d+\.\d s ", out, re.M), out[-6000:]
    assert re.search(r"^promotion: PROMOTED: no model promoted yet; fid ", out, re.M), out[-6000:]
