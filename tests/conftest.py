"""Shared fixtures: a real S3-compatible server process (moto) on loopback, one local Ray cluster
per session, and the shared test data. Nothing the product depends on is mocked. The helpers
behind them, and those the test modules share, are in tests/support/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import SHARED_DATA
from tests.support.s3 import MotoServer, TcpProxy, create_bucket, s3_credentials


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server as its own process; credentials are dummies it accepts."""
    with MotoServer() as moto, s3_credentials():
        yield moto.endpoint


@pytest.fixture
def s3_endpoint_checking_keys(s3_endpoint: str) -> Iterator[str]:
    """A second moto server that checks credentials as AWS does (moto's IAM authentication): only
    its first request is let through unchecked, so a test can create its bucket with it."""
    with MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": "1"}) as moto:
        yield moto.endpoint


@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[TcpProxy]:
    """A running TcpProxy to the S3 test server: use `s3_proxy.endpoint` as the store's endpoint."""
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket."""
    return create_bucket(s3_endpoint)


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
        # address="local": always a cluster of the session's own, never one another process
        # started with `ray start` (which Ray would otherwise find through /tmp/ray).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The shared MNIST test set placed in torchvision's layout (<root>/MNIST/raw/)."""
    src = SHARED_DATA / "mnist"
    if not (src / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"MNIST test data not found at {src} (set DIFFPIPE_TEST_DATA to the shared data folder)"
        )
    return src


@pytest.fixture(scope="module")
def prefect_harness():
    """Prefect's test harness (a temporary API and database) for one test module's flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
