"""The embedded local Ray cluster is the run's own: no other process can use it, and it leaves no
folder behind.

Ray 2.60 binds its gRPC servers to every interface and has no setting that binds them to loopback
(README: Ray cluster), so what keeps another process off the cluster is Ray's token auth, with a
token made for the run. The probes reach the cluster at the address Ray gives it (the node's own
interface, as a machine on the network would) with real Ray clients; a control with the run's
token shows that it is the token they lack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.paths import REPO

pytestmark = pytest.mark.slow

# A run's driver: starts the local cluster as every stage does, says where it is, and holds it
# until its stdin closes.
DRIVER = """
import json, os, sys
import ray
from tasks.config import RayConfig
from tasks.ray_runtime import ensure_ray

ensure_ray(RayConfig(num_cpus=1))
node = ray.nodes()[0]
print(json.dumps({
    "gcs": ray.get_runtime_context().gcs_address,
    "raylet": f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}",
    "token": os.environ["RAY_AUTH_TOKEN"],
}), flush=True)
sys.stdin.read()
"""

# Another process: joins the cluster as a driver and runs a task on it.
SUBMIT = """
import sys
import ray

@ray.remote
def answer():
    return 42

try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("ran", ray.get(answer.remote(), timeout=60))
except Exception as err:
    chain = []
    while err is not None:
        chain.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    print("refused", " <- ".join(chain).replace("\\n", " "))
"""

# Another process: asks the raylet (which leases workers and runs their tasks) directly.
RAYLET = """
import sys
import grpc
from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

token = sys.argv[2] if len(sys.argv) > 2 else None
metadata = [("authorization", f"Bearer {token}")] if token else []
stub = node_manager_pb2_grpc.NodeManagerServiceStub(grpc.insecure_channel(sys.argv[1]))
try:
    stub.GetSystemConfig(node_manager_pb2.GetSystemConfigRequest(), metadata=metadata, timeout=30)
    print("answered")
except grpc.RpcError as err:
    print("refused", err.code().name)
"""


def _env(tmpdir: Path, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # HOME: a fresh one, so no ~/.ray/auth_token of this machine is found, nor made unnoticed.
    env |= {"TMPDIR": str(tmpdir), "HOME": str(home), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return env | extra


def _probe(script: str, env: dict[str, str], *args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,  # a guard against a hang, not a measure
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith(("ran", "refused", "ans"))]
    assert len(lines) == 1, (run.stdout[-2000:], run.stderr[-3000:])
    return lines[0]


def test_no_other_process_can_use_a_run_s_local_cluster_and_it_leaves_no_folder(tmp_path):
    # A short temp folder of its own: Ray's socket paths below it must stay under 108 bytes.
    tmpdir = Path(tempfile.mkdtemp(prefix="dpt-", dir="/tmp"))
    home, other_home = tmp_path / "home", tmp_path / "other-home"
    home.mkdir()
    other_home.mkdir()
    try:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER],
            cwd=REPO,
            env=_env(tmpdir, home),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert driver.stdout is not None and driver.stdin is not None
            line = driver.stdout.readline()
            while line and not line.startswith("{"):  # Ray may print first
                line = driver.stdout.readline()
            cluster = json.loads(line)
            # Ray's session folder lies in the run's own temporary folder, named for the watchdog.
            (folder,) = tmpdir.glob(f"diffpipe-{driver.pid}-ray-*")
            assert list(folder.glob("session_*/sockets"))
            assert not (tmpdir / "ray").exists()

            # Ray gives up on a cluster it cannot join after this many seconds (default 20).
            other = _env(tmpdir, other_home, RAY_gcs_server_port_wait_time_s="3")
            wrong = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
            for env in (other, other | wrong):
                outcome = _probe(SUBMIT, env, cluster["gcs"])
                assert outcome.startswith("refused"), outcome
                assert "Unauthenticated" in outcome or "AuthenticationError" in outcome, outcome
            assert _probe(RAYLET, other, cluster["raylet"]) == "refused UNAUTHENTICATED"
            assert _probe(RAYLET, other, cluster["raylet"], "0" * 64) == "refused UNAUTHENTICATED"

            # The control: with the run's token, the same probes get in.
            right = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster["token"]}
            assert _probe(SUBMIT, other | right, cluster["gcs"]) == "ran 42"
            assert _probe(RAYLET, other, cluster["raylet"], cluster["token"]) == "answered"

            driver.stdin.close()
            assert driver.wait(timeout=120) == 0
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        # The token was never written to a file, and Ray's folder went with the cluster.
        assert not (home / ".ray").exists()
        assert not list(tmpdir.glob(f"diffpipe-{driver.pid}-*"))
        assert not (tmpdir / "ray").exists()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
