"""Object storage addressed by URL through fsspec: local directories and S3-compatible stores.

Every write is atomic: a reader sees the whole object or nothing. Locally the bytes go to a hidden
temporary file beside the target and are committed with `os.replace`. On S3 they are first staged
in a spool (memory, then a temporary file), then uploaded as a multipart upload opened with
`autocommit=False` that becomes visible only on `commit()` and is aborted on error (s3fs would
otherwise commit a partial object when an exception escapes `with`).

An S3 store rides out an outage: each call (a read, a listing, a whole upload, one read of a
stream) is retried under `tasks.retry`'s policy until `storage.retry_budget_s` is spent, and then
fails with one `StorageUnavailableError` naming the endpoint. The spool is what lets an upload that
an outage cut be redone whole; an upload whose abort could not reach the store is aborted once the
store is back. botocore's own retries are off, so the budget is the only patience (against a
refused port they took 5-8 s per call, outside any budget). A local store is not retried: disk
full or permission denied do not pass by waiting.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

import fsspec

from tasks import usage
from tasks.config import RequestKind, StorageConfig
from tasks.retry import STORE_CONNECT_TIMEOUT_S, RetryBudgetSpent, retry_transient

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

T = TypeVar("T")

_SPOOL_IN_MEMORY = 16 << 20  # bytes of an upload staged in memory; beyond, a temporary file
_COPY_CHUNK = 8 << 20
# botocore's answers that mean "these credentials are not accepted here", and its errors for "no
# credentials found at all" (raised before anything is sent).
_REFUSED_CREDENTIALS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
    }
)
_NO_CREDENTIALS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
)
_CREDENTIALS_HELP = (
    "Provide them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for "
    "temporary ones), or AWS_PROFILE naming a profile in ~/.aws/credentials, or run where an "
    "instance or container role grants them; on a Ray cluster every node needs them in its own "
    "environment or role."
)


@dataclass(frozen=True)
class StoredObject:
    """One object as a listing shows it: its key, size in bytes and when it was last written."""

    key: str
    bytes: int
    written: datetime


Listing = list[StoredObject]  # `Store.walk`'s answer (the class's own `list` is a method)


class StorageError(RuntimeError):
    """The store cannot be used as configured: missing bucket or credentials, endpoint down."""


class StoreKeyError(StorageError, ValueError):
    """A key that would leave the storage root (a record edited by hand to point outside it)."""


class StorageCredentialsError(StorageError):
    """No S3 credentials were found, or the store refused them. Not transient: never retried."""


class StorageUnavailableError(StorageError, RetryBudgetSpent):
    """The store did not answer for the whole retry budget (`storage.retry_budget_s`)."""


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


def _credentials_problem(err: BaseException) -> tuple[Literal["missing", "refused"], str] | None:
    """Whether `err` (or what it was raised from) says the S3 credentials are missing or refused,
    and botocore's or the store's own words for it; None when it is about something else."""
    current: BaseException | None = err
    while current is not None:
        kind = type(current)
        if kind.__name__ in _NO_CREDENTIALS and kind.__module__.startswith("botocore"):
            return "missing", str(current)
        response = getattr(current, "response", None)
        error = response.get("Error", {}) if isinstance(response, dict) else {}
        if error.get("Code") in _REFUSED_CREDENTIALS:
            return "refused", f"{error['Code']}: {error.get('Message', '')}"
        current = current.__cause__
    return None


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
            # One attempt per call: `tasks.retry` does the retrying, within the configured budget.
            options["config_kwargs"] = {
                "retries": {"total_max_attempts": 1},
                "connect_timeout": STORE_CONNECT_TIMEOUT_S,
            }
            # Cached listings go stale when another process (a Ray worker) writes the same prefix.
            options["use_listings_cache"] = False
            # Its clients count every request the store answers (`tasks.usage`).
            options["session"] = usage.counted_session()
        self.fs = fsspec.filesystem(self.protocol, **options)
        if self.is_local:
            # Taken literally: no URL decoding, so spaces, '#', '?' and '%' stay what they are.
            self.root_path = cfg.root.rstrip("/") or "/"
            Path(self.root_path).mkdir(parents=True, exist_ok=True)
        else:
            self.root_path = cfg.root.removeprefix("s3://").rstrip("/")
            self._check_bucket()

    @property
    def endpoint(self) -> str:
        """Where the store is, for messages."""
        if self.is_local:
            return "the local filesystem"
        return self.config.endpoint_url or "the AWS default endpoint"

    def _check_bucket(self) -> None:
        """Fail now, with the reason, when the bucket cannot be used: it does not exist, the
        credentials are missing or refused, or the endpoint stays unreachable."""
        bucket, _, prefix = self.root_path.partition("/")
        root = self.config.root
        # A listing below the root, as a policy that grants only the root's prefix allows. Unlike
        # fs.exists, it raises what went wrong instead of answering False to every error.
        listing = {"Bucket": bucket, "MaxKeys": 1, **({"Prefix": f"{prefix}/"} if prefix else {})}
        try:
            self._retry(
                lambda: self.fs.call_s3("list_objects_v2", **listing),
                f"checking bucket {bucket!r}",
            )
        except FileNotFoundError:
            raise StorageError(
                f"bucket {bucket!r} of storage root {root!r} does not exist at endpoint "
                f"{self.endpoint}; create it first (e.g. `aws s3 mb s3://{bucket}`) or fix "
                "storage.endpoint_url / AWS_ENDPOINT_URL"
            ) from None
        except StorageUnavailableError:
            raise
        except Exception as err:
            problem = _credentials_problem(err)
            if problem is not None and problem[0] == "missing":
                raise StorageCredentialsError(
                    f"no S3 credentials found for storage root {root!r} (endpoint "
                    f"{self.endpoint}): botocore looked in the environment, the shared "
                    "credentials and config files and the instance or container role, and "
                    f"found none. {_CREDENTIALS_HELP}"
                ) from err
            if problem is not None:
                raise StorageCredentialsError(
                    f"the object store at {self.endpoint} refused the S3 credentials for storage "
                    f"root {root!r} ({problem[1]}). Check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, which expires) or the profile "
                    f"AWS_PROFILE names: they must be keys of this store. {_CREDENTIALS_HELP}"
                ) from err
            if not isinstance(err, PermissionError):
                raise
            # Listing may be denied while reading and writing objects is allowed.

    # -- retries ------------------------------------------------------------------------------
    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Run one store call under the retry policy (S3 only)."""
        if self.is_local:
            return fn()
        return retry_transient(
            fn,
            budget_s=self.config.retry_budget_s,
            what=what,
            give_up=functools.partial(self._unavailable, what),
        )

    def _unavailable(
        self, what: str, err: Exception, attempts: int, seconds: float
    ) -> StorageUnavailableError:
        budget = self.config.retry_budget_s
        return StorageUnavailableError(
            f"object store unreachable at endpoint {self.endpoint} (storage root "
            f"{self.config.root!r}): {what} kept failing for {seconds:.1f} s, {attempts} "
            f"attempt{'s' if attempts > 1 else ''} (storage.retry_budget_s = {budget:g}); last "
            f"error: {type(err).__name__}: {err}. Check that the endpoint is up and reachable "
            "from this machine (address and port, network, proxy, DNS), or raise "
            "storage.retry_budget_s to ride out longer outages."
        )

    # -- addressing ---------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The filesystem path of `key`; a key that would leave the root is refused."""
        key = key.rstrip("/")  # a folder's trailing slash; a leading one is refused below
        if key and any(p in ("", ".", "..") for p in key.split("/")):
            raise StoreKeyError(f"storage key {key!r} is not a plain path below the storage root")
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

    def _count_local(self, kind: RequestKind, *, read: int = 0, written: int = 0) -> None:
        """Count a local file operation as the request it stands for (S3's are counted by the
        client's events: `tasks.usage`)."""
        if self.is_local:
            usage.count_request(kind, read=read, written=written)

    # -- reads --------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        path = self.path(key)
        self._count_local("head")
        return self._retry(lambda: bool(self.fs.exists(path)), f"checking {self.url(key)}")

    def size(self, key: str) -> int:
        path = self.path(key)
        self._count_local("head")
        return self._retry(lambda: int(self.fs.size(path)), f"sizing {self.url(key)}")

    def read_bytes(self, key: str) -> bytes:
        path = self.path(key)
        self._count_local("get")  # a missing object's GET is a request too
        data = self._retry(lambda: bytes(self.fs.cat_file(path)), f"reading {self.url(key)}")
        if self.is_local:
            usage.count_read(len(data))
        return data

    def read_json(self, key: str) -> Any:  # decoded JSON: its shape is the caller's record type
        return json.loads(self.read_bytes(key))

    def open_read(self, key: str) -> IO[bytes]:
        """A stream of the object's bytes. On S3 a read that an outage cut is retried from where
        it stopped, so a long read (a training shard) rides the outage out too."""
        path, what = self.path(key), f"reading {self.url(key)}"
        if self.is_local:
            self._count_local("get")
            f = self.fs.open(path, "rb")
            return io.BufferedReader(usage.CountingReader(f), 1 << 16)
        remote = self._retry(lambda: self.fs.open(path, "rb"), what)
        return io.BufferedReader(_ResumingReader(remote, self, what))

    def list(self, prefix: str) -> list[str]:
        """Keys of the objects directly below `prefix` (a 'folder'), sorted; [] when there is none."""
        path = self.path(prefix)
        try:
            entries = self._retry(
                lambda: self.fs.ls(path, detail=True), f"listing {self.url(prefix)}"
            )
        except FileNotFoundError:
            return []
        finally:
            self._count_local("list")
        keys = [self.key_of(e["name"]) for e in entries if e.get("type") != "directory"]
        return sorted(k for k in keys if not k.rsplit("/", 1)[-1].startswith(".tmp-"))

    def walk(self, prefix: str = "", *, unfinished: bool = False) -> Listing:
        """Every object below `prefix`, at any depth, with its size and last write, sorted by
        key; [] when there is none. One listing (paged on S3), no object is read. `unfinished`:
        instead, the temporary files of local writes that never finished (`.tmp-*`: their
        writer was killed before the rename), which no reader ever sees."""
        path = self.path(prefix)
        try:
            found = self._retry(
                lambda: self.fs.find(path, detail=True), f"listing {self.url(prefix)} (all levels)"
            )
        finally:
            self._count_local("list")
        objects = []
        for name, info in found.items():
            key = self.key_of(name)
            temporary = key.rsplit("/", 1)[-1].startswith(".tmp-")
            if info.get("type") == "directory" or temporary != unfinished:
                continue
            written = info.get("LastModified") or datetime.fromtimestamp(info["mtime"], UTC)
            objects.append(StoredObject(key, int(info["size"]), written.astimezone(UTC)))
        return sorted(objects, key=lambda o: o.key)

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
                f.flush()
                self._count_local("put", written=os.fstat(f.fileno()).st_size)
            return
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            yield spool
            self._upload(spool, key)

    def _upload(self, source: IO[bytes], key: str) -> None:
        """Upload all of `source` to `key`, whole or not at all, retrying the whole upload."""
        target = self.path(key)
        unaborted: list[Any] = []  # s3fs files whose multipart upload is still open on the store

        def upload() -> None:
            source.seek(0)
            f = self.fs.open(target, "wb", autocommit=False)
            try:
                shutil.copyfileobj(source, f, _COPY_CHUNK)
                f.close()
                f.commit()
            except BaseException:
                try:
                    f.discard()
                except Exception:  # the store is down: abort the upload once it is back
                    unaborted.append(f)
                f.closed = True  # discarded: closing it again would upload its buffer
                raise

        self._retry(upload, f"writing {self.url(key)}")
        for f in unaborted:
            with contextlib.suppress(Exception):
                f.discard()

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.is_local:
            with atomic_local_file(self.path(key)) as f:
                f.write(data)
            self._count_local("put", written=len(data))
            return
        self._upload(io.BytesIO(data), key)

    def write_json(self, key: str, obj: Any) -> None:  # any JSON-able value
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def delete(self, key: str) -> None:
        path = self.path(key)
        self._count_local("delete")
        with contextlib.suppress(FileNotFoundError):
            self._retry(lambda: self.fs.rm(path), f"deleting {self.url(key)}")


class _ResumingReader(io.RawIOBase):
    """An S3 file opened for reading whose reads ride out an outage. fsspec moves a file's
    position only when a read succeeds, so a read that failed can simply be asked again."""

    def __init__(self, remote: Any, store: Store, what: str):  # remote: an s3fs file
        super().__init__()
        self._remote, self._store, self._what = remote, store, what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._remote.seek(offset, whence))

    def tell(self) -> int:
        return int(self._remote.tell())

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data: bytes = self._store._retry(lambda: self._remote.read(len(view)), self._what)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._remote.close()
        super().close()


@functools.lru_cache(maxsize=8)
def open_store(cfg: StorageConfig) -> Store:
    """The process's `Store` for a resolved config: built (and an S3 bucket checked) once."""
    return Store(cfg)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
