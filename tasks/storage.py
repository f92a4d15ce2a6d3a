"""Object storage addressed by URL through fsspec: local directories and S3-compatible stores.

Every write is atomic: a reader sees the whole object or nothing. Locally the bytes go to a hidden
temporary file beside the target and are committed with `os.replace`; on S3 the upload is a
multipart upload opened with `autocommit=False` that becomes visible only on `commit()` and is
aborted on error (s3fs would otherwise commit a partial object when an exception escapes `with`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

from tasks.config import StorageConfig
from tasks.retry import retry_transient


class StorageError(RuntimeError):
    """The store cannot be used as configured (missing bucket, unreachable endpoint)."""


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
    """Keys are '/'-separated paths below the configured root, e.g. `runs/nightly/config.json`.

    Built from a resolved `StorageConfig` (`tasks.config.resolve_storage`: an absolute local path
    or an S3 URL with its endpoint); `open_store` builds one per process and config.
    """

    def __init__(self, cfg: StorageConfig):
        if cfg.is_local and not os.path.isabs(cfg.root):
            raise ValueError(
                f"storage root {cfg.root!r} is not resolved; build the config with "
                "tasks.config.load_config or resolve_storage"
            )
        self.config = cfg
        self.is_local = cfg.is_local
        self.protocol = "file" if self.is_local else "s3"
        options: dict[str, Any] = {}  # fsspec's keyword arguments for the filesystem
        if not self.is_local:
            client_kwargs: dict[str, str] = {}
            if cfg.endpoint_url:
                client_kwargs["endpoint_url"] = cfg.endpoint_url
            if cfg.region:
                client_kwargs["region_name"] = cfg.region
            options["client_kwargs"] = client_kwargs
            # Cached listings go stale when another process (a Ray worker) writes the same prefix.
            options["use_listings_cache"] = False
        self.fs = fsspec.filesystem(self.protocol, **options)
        if self.is_local:
            # Taken literally: no URL decoding, so spaces, '#', '?' and '%' stay what they are.
            self.root_path = cfg.root.rstrip("/") or "/"
            Path(self.root_path).mkdir(parents=True, exist_ok=True)
        else:
            self.root_path = cfg.root.removeprefix("s3://").rstrip("/")
            self._check_bucket()

    def _check_bucket(self) -> None:
        bucket = self.root_path.split("/", 1)[0]
        try:
            exists = retry_transient(lambda: self.fs.exists(bucket))
        except PermissionError:
            exists = True  # listing buckets may be denied while objects are allowed
        if not exists:
            raise StorageError(
                f"bucket {bucket!r} of storage root {self.config.root!r} does not exist or is not "
                f"reachable at endpoint {self.config.endpoint_url or 'AWS default'}; create it "
                f"first (e.g. `aws s3 mb s3://{bucket}`) or fix storage.endpoint_url / AWS_ENDPOINT_URL"
            )

    # -- addressing ---------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of `key`; a key that would leave the root is refused."""
        key = key.strip("/")
        parts = key.split("/")
        if key and any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"storage key {key!r} is not a plain path below the storage root")
        return f"{self.root_path.rstrip('/')}/{key}" if key else self.root_path

    def url(self, key: str) -> str:
        """Full URL of a key (what reports and logs show)."""
        return f"{self.protocol}://{self.path(key)}"

    def key_of(self, path: str) -> str:
        """The key of a filesystem path below the root (as `fs.ls` returns them)."""
        path = path.removeprefix(f"{self.protocol}://")
        root = self.root_path.rstrip("/") + "/"
        if not path.startswith(root):
            raise ValueError(f"{path!r} is not below the storage root {self.config.root!r}")
        return path[len(root) :]

    # -- reads --------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return retry_transient(lambda: bool(self.fs.exists(self.path(key))))

    def size(self, key: str) -> int:
        return retry_transient(lambda: int(self.fs.size(self.path(key))))

    def read_bytes(self, key: str) -> bytes:
        return retry_transient(lambda: bytes(self.fs.cat_file(self.path(key))))

    def read_json(self, key: str) -> Any:  # decoded JSON: its shape is the caller's record type
        return json.loads(self.read_bytes(key))

    def open_read(self, key: str) -> IO[bytes]:
        f: IO[bytes] = self.fs.open(self.path(key), "rb")
        return f

    def list(self, prefix: str) -> list[str]:
        """Keys of the objects directly below `prefix` (a 'folder'), sorted; [] when there is none."""
        try:
            entries = retry_transient(lambda: self.fs.ls(self.path(prefix), detail=True))
        except FileNotFoundError:
            return []
        keys = [self.key_of(e["name"]) for e in entries if e.get("type") != "directory"]
        return sorted(k for k in keys if not k.rsplit("/", 1)[-1].startswith(".tmp-"))

    def sha256(self, key: str) -> str:
        def digest() -> str:
            with self.open_read(key) as f:
                return sha256_stream(f)

        return retry_transient(digest)

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

    def write_json(self, key: str, obj: Any) -> None:  # any JSON-able value
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key))


@functools.lru_cache(maxsize=8)
def open_store(cfg: StorageConfig) -> Store:
    """The process's `Store` for a resolved config: built (and an S3 bucket checked) once."""
    return Store(cfg)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
