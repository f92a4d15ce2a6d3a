"""Shared fixtures: a real S3-compatible server process (moto) on loopback, one local Ray cluster
per session, and the shared test data. Nothing the product depends on is mocked."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DIFFPIPE_TEST_DATA", REPO.parent / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def start_moto(port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A moto S3 server process on 127.0.0.1:`port`, listening when this returns."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_for_port(port)
    except BaseException:
        proc.kill()
        raise
    return proc


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server as its own process; credentials are dummies it accepts."""
    port = free_port()
    proc = start_moto(port)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        saved = {
            k: os.environ.get(k)
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        }
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        yield endpoint
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_endpoint_checking_keys(s3_endpoint):
    """A second moto server that checks credentials as AWS does (moto's IAM authentication): only
    its first request is let through unchecked, so a test can create its bucket with it."""
    port = free_port()
    proc = start_moto(port, {"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class TcpProxy:
    """tests/tcp_proxy.py as a process in front of the S3 test server: `stop()` kills it (SIGKILL:
    connections drop, new ones are refused), `start()` brings it back on the same port."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target_port = target_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None, "the proxy is already running"
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "tcp_proxy.py"),
                str(self.port),
                str(self.target_port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise RuntimeError(f"tcp_proxy did not start on port {self.port} ({proc.wait()})")
        self.proc = proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def s3_proxy(s3_endpoint):
    """A running TcpProxy to the S3 test server: use `s3_proxy.endpoint` as the store's endpoint."""
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket (created without a location constraint, as a custom endpoint needs)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_storage(s3_endpoint, s3_bucket):
    from tasks.config import StorageConfig

    return StorageConfig(root=f"s3://{s3_bucket}/pipeline", endpoint_url=s3_endpoint)


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray cluster for the whole session (starting one costs seconds). Its workers
    inherit the environment at init, so the S3 test credentials are set first."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The shared MNIST test set placed in torchvision's layout (<root>/MNIST/raw/)."""
    src = DATA_DIR / "mnist"
    if not (src / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"MNIST test data not found at {src} (set DIFFPIPE_TEST_DATA to the shared data folder)"
        )
    return src
