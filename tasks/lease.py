"""One writer per run: a lease object in the store, held by the run that writes.

A nightly or `diffpipe train` holds its run's lease (`runs/<run_id>/lease/lease.json`); a
promotion, rollback or repair holds its model's (`models/<name>/lease/lease.json`), so that the
read-modify-write of `history.json` and `current.json` has one writer. The lease names its holder
(host, pid, start, Prefect flow run) and an expiry; a daemon thread renews it every third of
`lease.timeout_s`. A second writer fails at once naming the holder, or waits (`--wait`); a lease
not renewed for `lease.timeout_s` (its holder crashed) is taken over.

Every change is conditional on what was read, so two contenders never both win:
- local store: created with `O_CREAT | O_EXCL`; renewed, taken over and released by comparing the
  bytes read, all under an exclusive `flock` of the lease folder (processes of one machine).
- S3: created with `If-None-Match: *`, renewed, taken over and released with `If-Match: <ETag>`
  (AWS S3, MinIO and moto, the test server, honour both; a store's answer is probed at each
  acquisition with a probe object).
- S3 without conditional writes (the probe's second put succeeded or was refused): each contender
  writes its own claim object, then lists the claims; it holds the lease only when no other live
  claim is listed, and withdraws its claim otherwise. Of two contenders at least one lists after
  both claims exist, so they never both hold (given a listing that shows every finished write, as
  AWS S3 and MinIO give); they may both withdraw, and then `--wait` tries again.

A holder on the contender's own host whose process no longer exists (a SIGKILLed nightly) holds
nothing: its lease is taken over at once instead of after the timeout.

A lease is a promise in time: a holder stalled for longer than the timeout (a frozen VM) loses its
lease without knowing until its next renewal fails, and that is reported when its work ends
(`LeaseLostError`). Expiry is judged by the reader's clock: hosts' clocks must agree to well within
the timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeVar

import fsspec.asyn
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks import layout
from tasks.config import LeaseConfig
from tasks.retry import RetryBudgetSpent, retry_transient
from tasks.storage import Store, atomic_local_file

log = logging.getLogger(__name__)

T = TypeVar("T")
FORMAT: Literal["diffusion-pipeline/lease@1"] = "diffusion-pipeline/lease@1"
_MAX_POLL_S = 5.0  # how often a waiting contender looks again, at most


CONTINUE_NIGHT_S = 20 * 3600.0  # a killed night is rerun the same day, or left as it ended


class LeaseHolder(BaseModel):
    """What a lease object holds: who holds it, and until when (seconds since the epoch)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["diffusion-pipeline/lease@1"] = FORMAT
    what: str  # "run 'nightly'", "model 'default'"
    command: str  # what the holder runs: nightly, train, promote
    host: str
    pid: int
    started_at: str  # ISO 8601, UTC
    flow_run: str | None = None  # the Prefect flow run id, when run as one
    night: str | None = None  # a nightly's night: a rerun after this holder died continues it
    token: str  # this acquisition's own id
    renewed_at: float
    expires_at: float

    def live(self, now: float) -> bool:
        """Not expired, and not known to be dead: a holder on this host whose process is gone
        (SIGKILLed, its machine's run crashed) holds nothing, and a rerun need not wait out the
        timeout. A pid since reused by another process only keeps the timeout."""
        return now < self.expires_at and not self._gone()

    def _gone(self) -> bool:
        if self.host != socket.gethostname():
            return False  # another machine's process: only its expiry tells
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: alive
            return False
        return False

    def describe(self) -> str:
        flow = f", flow run {self.flow_run}" if self.flow_run else ""
        return (
            f"`{self.command}` on host {self.host}, pid {self.pid}, started {self.started_at}{flow}"
        )

    def renewed(self, now: float, timeout_s: float) -> LeaseHolder:
        return self.model_copy(update={"renewed_at": now, "expires_at": now + timeout_s})

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> LeaseHolder | None:
        """The holder in `data`, or None when it is damaged (a writer died mid-write locally)."""
        try:
            return cls.model_validate_json(data)
        except ValidationError:
            return None


class LeaseHeldError(RuntimeError):
    """Another live process holds the lease: the message names it."""

    def __init__(self, what: str, holder: LeaseHolder, url: str):
        now = time.time()
        timeout_s = holder.expires_at - holder.renewed_at  # the holder's lease.timeout_s
        super().__init__(
            f"{what} is in use by {holder.describe()} (lease {url}, renewed "
            f"{max(0.0, now - holder.renewed_at):.0f} s ago); run again with --wait to start "
            "when it ends, or, if that process is gone, its lease expires "
            f"{max(0.0, holder.expires_at - now):.0f} s from now (its lease.timeout_s = {timeout_s:g})"
        )
        self.holder = holder


class LeaseLostError(RuntimeError):
    """The lease expired or was taken over while its holder worked: another writer may have run."""


# -- one lease object, changed only conditionally ----------------------------------------------
class _Versioned(Protocol):
    """One object whose every change is conditional on the version last read."""

    def create(self, data: bytes) -> str | None:
        """Create it with `data`; its version, or None when it exists."""

    def read(self) -> tuple[bytes, str] | None:
        """Its bytes and version, or None when it does not exist."""

    def replace(self, data: bytes, version: str) -> str | None:
        """Replace it when it is still at `version`; the new version, or None."""

    def delete(self, version: str) -> bool:
        """Delete it when it is still at `version`."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalObject:
    """A local file: `O_EXCL` creates it; every change compares bytes under the folder's flock."""

    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _bytes(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return _digest(data)

    def read(self) -> tuple[bytes, str] | None:
        with self._locked():
            data = self._bytes()
        return None if data is None else (data, _digest(data))

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked():
            current = self._bytes()
            if current is None or _digest(current) != version:
                return None
            with atomic_local_file(self.path) as f:
                f.write(data)
            return _digest(data)

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._bytes()
            if current is None or _digest(current) != version:
                return False
            os.remove(self.path)
            return True


class _S3Object:
    """An S3 object: `If-None-Match: *` creates it, `If-Match: <ETag>` changes it. s3fs answers a
    failed precondition (412) with FileExistsError, a missing object with FileNotFoundError."""

    def __init__(self, store: Store, key: str):
        self.store, self.key = store, key
        self.bucket, _, self.name = store.path(key).partition("/")

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return retry_transient(
            fn, budget_s=self.store.config.retry_budget_s, what=f"{what} {self.store.url(self.key)}"
        )

    def _put(self, data: bytes, **condition: str) -> str | None:
        def put() -> str | None:
            try:
                answer = self.store.fs.call_s3(
                    "put_object", Bucket=self.bucket, Key=self.name, Body=data, **condition
                )
            except (FileExistsError, FileNotFoundError):
                return None
            return str(answer["ETag"])

        return self._call(put, "writing")

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def read(self) -> tuple[bytes, str] | None:
        fs = self.store.fs

        async def get() -> tuple[bytes, str]:  # the bytes and the ETag of one answer
            answer = await fs._call_s3("get_object", Bucket=self.bucket, Key=self.name)
            body = answer["Body"]
            try:
                data: bytes = await body.read()
            finally:
                body.close()
            return data, str(answer["ETag"])

        def fetch() -> tuple[bytes, str] | None:
            try:
                found: tuple[bytes, str] = fsspec.asyn.sync(fs.loop, get)
                return found
            except FileNotFoundError:
                return None

        return self._call(fetch, "reading")

    def delete(self, version: str) -> bool:
        def delete() -> bool:
            try:
                self.store.fs.call_s3(
                    "delete_object", Bucket=self.bucket, Key=self.name, IfMatch=version
                )
            except (FileExistsError, FileNotFoundError):
                return False
            return True

        try:
            return self._call(delete, "deleting")
        except RetryBudgetSpent:
            raise
        except Exception as err:  # noqa: BLE001 - a store without conditional deletes
            log.debug("conditional delete refused (%s); comparing, then deleting", err)
            found = self.read()
            if found is None or found[1] != version:
                return False
            self.store.delete(self.key)
            return True


def conditional_writes(store: Store, prefix: str) -> bool:
    """Whether the store honours `If-None-Match: *`: a probe object put twice with it must be
    refused the second time. Always True locally (`O_EXCL`)."""
    if store.is_local:
        return True
    probe = _S3Object(store, layout.lease_claim(prefix, f"probe{uuid.uuid4().hex}"))
    try:
        first = probe.create(b"probe\n")
        second = probe.create(b"probe\n") if first is not None else None
    except RetryBudgetSpent:
        raise
    except Exception as err:  # noqa: BLE001 - the store refused the header itself
        log.warning("the store refuses conditional writes (%s): leases use claims instead", err)
        return False
    finally:
        with contextlib.suppress(Exception):
            store.delete(probe.key)
    honoured = first is not None and second is None
    if not honoured:
        log.warning(
            "the store at %s ignores If-None-Match: leases use claims instead", store.endpoint
        )
    return honoured


# -- the two ways to hold a lease --------------------------------------------------------------
class _Strategy(Protocol):
    url: str

    def acquire(self, mine: LeaseHolder) -> LeaseHolder | None:
        """Hold the lease as `mine`: None when held now, else the live holder."""

    def renew(self, mine: LeaseHolder) -> bool:
        """Write `mine` (renewed) over the lease; False when it is no longer ours."""

    def release(self, mine: LeaseHolder) -> None: ...

    def holder(self) -> LeaseHolder | None:
        """The live holder, if any."""

    def recorded(self) -> list[LeaseHolder]:
        """Every holder the lease names now, live or not."""


class _OneObject:
    """The lease is one object, changed conditionally (`_Versioned`)."""

    def __init__(self, obj: _Versioned, url: str):
        self.obj, self.url = obj, url
        self.version: str | None = None

    def acquire(self, mine: LeaseHolder) -> LeaseHolder | None:
        for _ in range(10):  # each round ends when another contender changed the lease first
            version = self.obj.create(mine.to_bytes())
            if version is not None:
                self.version = version
                return None
            found = self.obj.read()
            if found is None:  # released between the two calls
                continue
            data, version = found
            other = LeaseHolder.parse(data)
            if other is not None and other.token == mine.token:  # our create, its answer lost
                self.version = version
                return None
            if other is not None and other.live(time.time()):
                return other
            taken = self.obj.replace(mine.to_bytes(), version)  # only if nobody else did
            if taken is not None:
                log.warning(
                    "took over the lease %s: %s",
                    self.url,
                    "it was damaged"
                    if other is None
                    else f"{other.describe()} last renewed it "
                    f"{time.time() - other.renewed_at:.0f} s ago",
                )
                self.version = taken
                return None
        raise RuntimeError(f"the lease {self.url} kept changing under 10 attempts to take it")

    def renew(self, mine: LeaseHolder) -> bool:
        assert self.version is not None, "renewing a lease that was not acquired"
        version = self.obj.replace(mine.to_bytes(), self.version)
        if version is None:  # taken over, or our write landed and its answer was lost
            found = self.obj.read()
            if found is None or LeaseHolder.parse(found[0]) != mine:
                return False
            version = found[1]
        self.version = version
        return True

    def release(self, mine: LeaseHolder) -> None:
        if self.version is not None and not self.obj.delete(self.version):
            log.warning("the lease %s was no longer ours to release", self.url)
        self.version = None

    def holder(self) -> LeaseHolder | None:
        found = self.obj.read()
        holder = None if found is None else LeaseHolder.parse(found[0])
        return holder if holder is not None and holder.live(time.time()) else None

    def recorded(self) -> list[LeaseHolder]:
        found = self.obj.read()
        holder = None if found is None else LeaseHolder.parse(found[0])
        return [] if holder is None else [holder]


class _Claims:
    """The compare-and-swap fallback for stores that ignore conditional writes: a claim object
    per contender, and a listing after writing one (see the module's docstring)."""

    def __init__(self, store: Store, prefix: str):
        self.store, self.prefix = store, prefix
        self.url = store.url(prefix)  # the folder of the claims

    def _live_claims(self, now: float) -> dict[str, LeaseHolder]:
        live = {}
        for key in self.store.list(self.prefix):
            if not layout.is_lease_claim(self.prefix, key):
                continue
            try:
                holder = LeaseHolder.parse(self.store.read_bytes(key))
            except FileNotFoundError:  # withdrawn since the listing
                continue
            if holder is not None and holder.live(now):
                live[key] = holder
            elif holder is not None:  # expired: its holder is gone
                self.store.delete(key)
        return live

    def acquire(self, mine: LeaseHolder) -> LeaseHolder | None:
        own = layout.lease_claim(self.prefix, mine.token)
        self.store.write_bytes(own, mine.to_bytes())
        others = [h for k, h in self._live_claims(time.time()).items() if k != own]
        if not others:
            return None
        self.store.delete(own)
        return min(others, key=lambda h: h.started_at)

    def renew(self, mine: LeaseHolder) -> bool:
        own = layout.lease_claim(self.prefix, mine.token)
        if not self.store.exists(own):  # expired, and removed by a contender
            return False
        self.store.write_bytes(own, mine.to_bytes())
        return True

    def release(self, mine: LeaseHolder) -> None:
        self.store.delete(layout.lease_claim(self.prefix, mine.token))

    def holder(self) -> LeaseHolder | None:
        live = self._live_claims(time.time())
        return min(live.values(), key=lambda h: h.started_at) if live else None

    def recorded(self) -> list[LeaseHolder]:
        found = []
        for key in self.store.list(self.prefix):
            if layout.is_lease_claim(self.prefix, key):
                with contextlib.suppress(FileNotFoundError):  # withdrawn since the listing
                    if (holder := LeaseHolder.parse(self.store.read_bytes(key))) is not None:
                        found.append(holder)
        return found


def _strategy(store: Store, prefix: str, conditional: bool | None) -> _Strategy:
    """The lease of folder `prefix`; `conditional` None = probe the store (S3)."""
    key = layout.lease_object(prefix)
    if store.is_local:
        return _OneObject(_LocalObject(store.path(key)), store.url(key))
    if conditional is None:
        conditional = conditional_writes(store, prefix)
    if conditional:
        return _OneObject(_S3Object(store, key), store.url(key))
    return _Claims(store, prefix)


# -- holding a lease while work runs -----------------------------------------------------------
class Lease:
    """A held lease, renewed by a daemon thread until `release`."""

    def __init__(self, strategy: _Strategy, mine: LeaseHolder, cfg: LeaseConfig):
        self.strategy, self.holder, self.cfg = strategy, mine, cfg
        self.lost: str | None = None  # why the lease is no longer ours, once it is not
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_until_released, name=f"lease {mine.what}", daemon=True
        )
        self._thread.start()

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.cfg.timeout_s / 3):
            renewed = self.holder.renewed(time.time(), self.cfg.timeout_s)
            try:
                ours = self.strategy.renew(renewed)
            except Exception as err:  # noqa: BLE001 - an outage: the next period tries again
                log.warning("renewing the lease %s failed: %s", self.strategy.url, err)
                ours = time.time() < self.holder.expires_at
                if ours:
                    continue
            if not ours:
                self.lost = (
                    f"the lease {self.strategy.url} of {self.holder.what} was lost while "
                    f"{self.holder.describe()} held it: not renewed within lease.timeout_s = "
                    f"{self.cfg.timeout_s:g} s, so another writer may have run meanwhile"
                )
                log.error("%s", self.lost)
                return
            self.holder = renewed

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost is None:
            self.strategy.release(self.holder)


def _acquire(
    strategy: _Strategy,
    what: str,
    command: str,
    cfg: LeaseConfig,
    wait: bool,
    flow_run: str | None,
    night: str | None = None,
) -> LeaseHolder:
    token = uuid.uuid4().hex
    announced: str | None = None
    while True:
        now = time.time()
        mine = LeaseHolder(
            what=what,
            command=command,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            flow_run=flow_run,
            night=night,
            token=token,
            renewed_at=now,
            expires_at=now + cfg.timeout_s,
        )
        other = strategy.acquire(mine)
        if other is None:
            return mine
        if not wait:
            raise LeaseHeldError(what, other, strategy.url)
        if other.token != announced:
            log.info("waiting for %s: in use by %s", what, other.describe())
            announced = other.token
        time.sleep(min(_MAX_POLL_S, cfg.timeout_s / 4) * random.uniform(0.5, 1.0))


@contextlib.contextmanager
def hold_lease(
    store: Store,
    prefix: str,
    cfg: LeaseConfig,
    *,
    what: str,
    command: str,
    wait: bool = False,
    flow_run: str | None = None,
    conditional: bool | None = None,
    night: str | None = None,
) -> Iterator[Lease]:
    """Hold the lease of folder `prefix` (a `layout.*_lease_prefix`) while the block runs.

    Raises LeaseHeldError naming the live holder, unless `wait`: then polls until it is free.
    `conditional` picks the mechanism on S3 (None: probe the store; False: the claims fallback).
    A lease lost while the block ran raises LeaseLostError after it, unless the block raised.
    `night` is recorded with the holder (`interrupted_nights`)."""
    strategy = _strategy(store, prefix, conditional)
    lease = Lease(strategy, _acquire(strategy, what, command, cfg, wait, flow_run, night), cfg)
    try:
        yield lease
    except BaseException:
        lease.release()
        raise
    lease.release()
    if lease.lost is not None:
        raise LeaseLostError(lease.lost)


def run_lease(
    store: Store,
    run_id: str,
    cfg: LeaseConfig,
    *,
    command: str,
    wait: bool = False,
    flow_run: str | None = None,
    night: str | None = None,
) -> contextlib.AbstractContextManager[Lease]:
    """The lease of run `run_id`: one nightly or training writes the run at a time."""
    prefix = layout.run_lease_prefix(run_id)
    return hold_lease(
        store,
        prefix,
        cfg,
        what=f"run {run_id!r}",
        command=command,
        wait=wait,
        flow_run=flow_run,
        night=night,
    )


def interrupted_nights(store: Store, run_id: str) -> list[str]:
    """The nights of run `run_id`'s nightlies that died holding its lease (SIGKILLed, their
    machine lost): never released, and no longer live. A rerun continues such a night, as a
    Prefect retry of its flow run would, so that the night keeps one report folder and one
    decision in the promotion history. Only a night whose holder was alive within
    `CONTINUE_NIGHT_S`: the next day's scheduled nightly starts a night of its own."""
    now = time.time()
    holders = _strategy(store, layout.run_lease_prefix(run_id), None).recorded()
    return sorted(
        h.night
        for h in holders
        if h.command == "nightly"
        and h.night
        and not h.live(now)
        and now - h.renewed_at < CONTINUE_NIGHT_S
    )


def model_lease(
    store: Store,
    model_name: str,
    cfg: LeaseConfig,
    *,
    command: str,
    wait: bool = False,
    flow_run: str | None = None,
) -> contextlib.AbstractContextManager[Lease]:
    """The lease of promoted model `model_name`: one promotion, rollback or repair at a time."""
    prefix = layout.model_lease_prefix(model_name)
    return hold_lease(
        store,
        prefix,
        cfg,
        what=f"model {model_name!r}",
        command=command,
        wait=wait,
        flow_run=flow_run,
    )


def refuse_if_held(store: Store, prefix: str, what: str) -> None:
    """Raise LeaseHeldError when a live holder has the lease of `prefix` now: the CLI's check
    before it starts Prefect and Ray (the flow's own acquisition is what excludes)."""
    strategy = _strategy(store, prefix, None)
    holder = strategy.holder()
    if holder is not None:
        raise LeaseHeldError(what, holder, strategy.url)
