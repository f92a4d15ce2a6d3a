"""Object storage addressed by URL through fsspec: local directories and S3-compatible stores.

Every write is atomic: a reader sees the whole object or nothing. Locally the bytes go to a hidden
temporary file beside the target and are committed with `os.replace`; on S3 the upload is a
multipart upload opened with `autocommit=False` that becomes visible only on `commit()` and is
aborted on error (s3fs would otherwise commit a partial object when an exception escapes `with`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec

from tasks.config import StorageConfig

T = TypeVar("T")

# Errors worth retrying: the network and the store's transient answers, never a missing key or bad data.
_TRANSIENT = (ConnectionError, TimeoutError, OSError)


def retry_transient(fn: Callable[[], T], *, attempts: int = 4, first_delay: float = 0.5) -> T:
    """Run `fn`, retrying transient I/O errors with exponential backoff; deterministic errors propagate."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except _TRANSIENT:
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def resolve_storage(cfg: StorageConfig) -> StorageConfig:
    """Make a local root absolute (Ray workers run in another directory) and fill the endpoint from env."""
    root = cfg.root
    if "://" not in root:
        root = Path(root).expanduser().resolve().as_uri()
    endpoint = (
        cfg.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if not root.startswith("s3://"):
        endpoint = None
    return cfg.model_copy(update={"root": root, "endpoint_url": endpoint})


@contextlib.contextmanager
def atomic_local_file(target: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Write a local file atomically: a hidden temp file beside it, fsync'd, then `os.replace`.
    Nothing is left behind when the block raises."""
    directory, name = os.path.split(os.fspath(target))
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def sha256_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


class Store:
    """Keys are '/'-separated paths below the configured root, e.g. `runs/nightly/checkpoints/latest.json`."""

    def __init__(self, cfg: StorageConfig):
        self.config = resolve_storage(cfg)
        protocol = self.config.root.partition("://")[0]
        self.protocol = protocol
        options: dict[str, Any] = {}
        if protocol == "s3":
            client_kwargs: dict[str, Any] = {}
            if self.config.endpoint_url:
                client_kwargs["endpoint_url"] = self.config.endpoint_url
            if self.config.region:
                client_kwargs["region_name"] = self.config.region
            options["client_kwargs"] = client_kwargs
            # Cached listings go stale when another process (a Ray worker) writes the same prefix.
            options["use_listings_cache"] = False
        self.fs = fsspec.filesystem(protocol, **options)
        self.root_path = self.fs._strip_protocol(self.config.root).rstrip("/")
        self.is_local = protocol == "file"
        if self.is_local:
            Path(self.root_path).mkdir(parents=True, exist_ok=True)
        elif protocol == "s3":
            bucket = self.root_path.split("/", 1)[0]
            try:
                exists = self.fs.exists(bucket)
            except PermissionError:
                exists = True  # listing buckets may be denied while objects are allowed
            if not exists:
                raise FileNotFoundError(
                    f"bucket {bucket!r} of storage root {self.config.root!r} does not exist or is not reachable "
                    f"at endpoint {self.config.endpoint_url or 'AWS default'}; create it first "
                    f"(e.g. `aws s3 mb s3://{bucket}`) or fix storage.endpoint_url / AWS_ENDPOINT_URL"
                )

    # -- addressing ---------------------------------------------------------------------------
    def path(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.root_path}/{key}" if key else self.root_path

    def url(self, key: str) -> str:
        """Full URL of a key (what webdataset, reports and logs show)."""
        return f"{self.protocol}://{self.path(key)}"

    def key_of(self, path_or_url: str) -> str:
        path = self.fs._strip_protocol(path_or_url)
        if not path.startswith(self.root_path + "/"):
            raise ValueError(f"{path_or_url!r} is not below the storage root {self.config.root!r}")
        return path[len(self.root_path) + 1 :]

    # -- reads --------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return retry_transient(lambda: self.fs.exists(self.path(key)))

    def read_bytes(self, key: str) -> bytes:
        return retry_transient(lambda: self.fs.cat_file(self.path(key)))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def read_json_or_none(self, key: str) -> Any | None:
        try:
            return self.read_json(key)
        except FileNotFoundError:
            return None

    def open_read(self, key: str) -> IO[bytes]:
        return self.fs.open(self.path(key), "rb")

    def list(self, prefix: str) -> list[str]:
        """Keys of the objects directly below `prefix` (a 'folder'), sorted; [] when there is none."""
        try:
            entries = retry_transient(lambda: self.fs.ls(self.path(prefix), detail=True))
        except FileNotFoundError:
            return []
        keys = [self.key_of(e["name"]) for e in entries if e.get("type") != "directory"]
        return sorted(k for k in keys if not k.rsplit("/", 1)[-1].startswith(".tmp-"))

    def sha256(self, key: str) -> str:
        with self.open_read(key) as f:
            return sha256_stream(f)

    # -- atomic writes ------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_atomic(self, key: str) -> Iterator[IO[bytes]]:
        """Write `key` atomically: visible whole after the block, absent if the block raises."""
        target = self.path(key)
        if self.is_local:
            with atomic_local_file(target) as f:
                yield f
            return
        f = self.fs.open(target, "wb", autocommit=False)
        try:
            yield f
            f.close()
            f.commit()
        except BaseException:
            f.discard()
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        def put() -> None:
            with self.open_atomic(key) as f:
                f.write(data)

        retry_transient(put)

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key))

    # -- webdataset -----------------------------------------------------------------------
    def register_webdataset_opener(self) -> None:
        """Let webdataset open this store's URLs through fsspec (it has no s3:// opener of its own).

        Registered per process: Ray workers call it after building their Store.
        """
        if self.is_local:
            return  # webdataset opens file:// URLs itself
        from webdataset.gopen import gopen_schemes

        fs = self.fs

        def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
            return fs.open(url, mode, block_size=max(bufsize, 1 << 22))

        gopen_schemes[self.protocol] = gopen_fsspec


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
