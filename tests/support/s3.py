"""The S3 test server and what stands in front of it, for the tests and the benchmarks: a real
moto server process on loopback (nothing the product depends on is mocked), and a TCP proxy that
makes it unreachable on demand.

The proxy is this module run as a process: `python -m tests.support.s3 LISTEN_PORT TARGET_PORT`.
Killing it (SIGKILL) drops every connection and refuses new ones, as an unreachable store does;
starting it again on the same port ends the outage, and the server behind it keeps its buckets
(moto holds them in memory, so restarting moto itself would lose them). It prints "ready" once it
listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tests.support.paths import REPO

# Dummy credentials moto accepts; the S3 client stack (and Ray's workers, which inherit the
# environment at start) read them from the environment.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def s3_credentials() -> Iterator[None]:
    """TEST_CREDENTIALS in this process's environment while the block runs."""
    saved = {k: os.environ.get(k) for k in TEST_CREDENTIALS}
    os.environ.update(TEST_CREDENTIALS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MotoServer:
    """A moto S3 server process on 127.0.0.1, listening when the constructor returns; `env` adds
    to its environment (moto's own settings). `stop()`, or leaving a `with` block, ends it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        try:
            wait_for_port(self.port)
        except BaseException:
            self.proc.kill()
            raise

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def create_bucket(endpoint: str, prefix: str = "test") -> str:
    """A fresh, empty bucket named `<prefix>-<random>` (created without a location constraint,
    as a custom endpoint needs); returns its name."""
    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


class TcpProxy:
    """This module's proxy as a process in front of the S3 test server: `stop()` kills it
    (SIGKILL: connections drop, new ones are refused), `start()` brings it back on the same
    port."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None, "the proxy is already running"
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.s3", str(self.port), str(self.target_port)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise RuntimeError(f"the TCP proxy did not start on port {self.port} ({proc.wait()})")
        self.proc = proc

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(listen_port: int, target_port: int) -> None:
    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))

    # reuse_address (asyncio's default on Unix) lets a restarted proxy bind the port at once.
    server = await asyncio.start_server(forward, "127.0.0.1", listen_port, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
