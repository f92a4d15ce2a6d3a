"""What a stage costs, counted where the work happens, never estimated (README: Cost).

Each process counts its own share:
- object-store requests by kind and the bytes moved: on S3 through botocore's `after-call` event of
  the Store's client, so exactly the requests the store answered (s3fs's ranged reads, multipart
  parts, the bucket check included), the bytes as the wire carried them (a GET's Content-Length,
  a PUT's or part's body); on a local store each file operation of the Store, the same way;
- CPU seconds from the kernel (`getrusage`: this process and its reaped children, e.g. training's
  data-loader processes, whose store counts land here too: the counters live in memory a forked
  child shares);
- GPU seconds: the wall time a Ray worker holding GPUs has lived, times the GPUs Ray assigned it:
  the time the stage had them reserved (what a bill charges), not their utilisation.

A Ray worker adds what it did since its last report to its driver's `_Ledger` (a Ray actor named
`diffpipe-usage` in the driver job's namespace, started by `tasks.ray_runtime.ensure_ray`) at the
end of each unit of work (`@reported`), before the unit's result goes back; so once the driver
has the results, the ledger holds their usage. The driver's `StageMeter` adds its own process's
share over the stage to the ledger's increase.
"""

from __future__ import annotations

import functools
import io
import logging
import multiprocessing
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, get_args

from pydantic import BaseModel, ConfigDict

from tasks.config import PricesConfig, RequestKind

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

KINDS: tuple[RequestKind, ...] = get_args(RequestKind)
LEDGER = "diffpipe-usage"

# botocore's operation names -> the kinds a bill lists (multipart parts apart from whole puts).
_OPERATIONS: dict[str, RequestKind] = {
    "ListObjectsV2": "list",
    "ListObjects": "list",
    "ListObjectVersions": "list",
    "ListMultipartUploads": "list",
    "ListParts": "list",
    "GetObject": "get",
    "HeadObject": "head",
    "HeadBucket": "head",
    "PutObject": "put",
    "CopyObject": "put",
    "CreateMultipartUpload": "put",
    "CompleteMultipartUpload": "put",
    "UploadPart": "part",
    "UploadPartCopy": "part",
    "DeleteObject": "delete",
    "DeleteObjects": "delete",
    "AbortMultipartUpload": "delete",
}
_SENT = "diffpipe_bytes_sent"  # request-context key: the body size, from before- to after-call


class Usage(BaseModel):
    """Device time, bytes and store requests of one stage (or one process's share of it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_s: float = 0.0  # CPU seconds, summed over processes (user + system)
    gpu_s: float = 0.0  # GPU seconds reserved: wall time x GPUs held
    bytes_read: int = 0
    bytes_written: int = 0
    requests: dict[RequestKind, int] = {}

    def __add__(self, other: Usage) -> Usage:
        return self._combine(other, 1)

    def __sub__(self, other: Usage) -> Usage:
        return self._combine(other, -1)

    def _combine(self, other: Usage, sign: int) -> Usage:
        counts = {k: self.requests.get(k, 0) + sign * other.requests.get(k, 0) for k in KINDS}
        return Usage(
            cpu_s=self.cpu_s + sign * other.cpu_s,
            gpu_s=self.gpu_s + sign * other.gpu_s,
            bytes_read=self.bytes_read + sign * other.bytes_read,
            bytes_written=self.bytes_written + sign * other.bytes_written,
            requests={k: n for k, n in counts.items() if n},
        )

    def describe(self) -> str:
        """'CPU 12.3 s, GPU 0 s, read 1.2 MB, wrote 3.4 MB, 12 requests (list 2, get 5, put 5)'."""
        kinds = ", ".join(f"{k} {self.requests[k]}" for k in KINDS if self.requests.get(k))
        total = sum(self.requests.values())
        return (
            f"CPU {self.cpu_s:.1f} s, GPU {self.gpu_s:.1f} s, read {size(self.bytes_read)}, "
            f"wrote {size(self.bytes_written)}, {total} requests" + (f" ({kinds})" if kinds else "")
        )


def size(n: int) -> str:
    """Bytes in decimal units, as stores bill them: '1.2 MB'."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


class Cost(BaseModel):
    """A night's cost at the configured prices (`prices` section), in `currency`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    currency: str
    gpu: float
    cpu: float
    requests: float
    total: float  # gpu + cpu + requests
    storage_per_month: float  # keeping the bytes the night wrote, per month
    usage: Usage  # what was priced: the stages' sum
    prices: PricesConfig

    def describe(self) -> str:
        u, p, c = self.usage, self.prices, self.currency
        return (
            f"{self.total:.4g} {c} = GPU {self.gpu:.4g} ({u.gpu_s / 3600:.3g} GPU-h x "
            f"{p.gpu_hour:g}) + CPU {self.cpu:.4g} ({u.cpu_s / 3600:.3g} CPU-h x {p.cpu_hour:g}) "
            f"+ requests {self.requests:.4g} ({sum(u.requests.values())}); keeping the "
            f"{size(u.bytes_written)} it wrote costs {self.storage_per_month:.4g} {c} a month"
        )


def cost(usage: Usage, prices: PricesConfig) -> Cost:
    gpu = usage.gpu_s / 3600 * prices.gpu_hour
    cpu = usage.cpu_s / 3600 * prices.cpu_hour
    requests = sum(
        n / 1000 * prices.per_1000_requests.get(k, 0.0) for k, n in usage.requests.items()
    )
    return Cost(
        currency=prices.currency,
        gpu=gpu,
        cpu=cpu,
        requests=requests,
        total=gpu + cpu + requests,
        storage_per_month=usage.bytes_written / 1e9 * prices.gb_month,
        usage=usage,
        prices=prices,
    )


# -- this process's counters ---------------------------------------------------------------------
# In memory that a forked child (a training data-loader process) shares with its parent: what the
# child reads from the store is counted where the parent reports it.
_COUNTS = multiprocessing.RawArray("q", len(KINDS) + 2)  # requests by kind, bytes read, written
_COUNTS_LOCK = multiprocessing.Lock()
_READ, _WRITTEN = len(KINDS), len(KINDS) + 1
_STARTED = time.monotonic()


def count_request(kind: RequestKind, *, read: int = 0, written: int = 0) -> None:
    """One request the store answered (or one local file operation), and the bytes it moved."""
    with _COUNTS_LOCK:
        _COUNTS[KINDS.index(kind)] += 1
        _COUNTS[_READ] += read
        _COUNTS[_WRITTEN] += written


def count_read(nbytes: int) -> None:
    with _COUNTS_LOCK:
        _COUNTS[_READ] += nbytes


def _ray_worker() -> Any | None:
    """The `ray` module when this process is a Ray worker (not a driver), else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from ray._private.worker import global_worker

    return ray if global_worker.mode == ray.WORKER_MODE else None


def process_usage() -> Usage:
    """Everything this process (and its reaped children) did since it started."""
    cpu = sum(
        r.ru_utime + r.ru_stime
        for r in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )
    ray = _ray_worker()
    gpus = len(ray.get_gpu_ids()) if ray is not None else 0
    with _COUNTS_LOCK:
        counts = list(_COUNTS)
    return Usage(
        cpu_s=cpu,
        gpu_s=(time.monotonic() - _STARTED) * gpus,
        bytes_read=counts[_READ],
        bytes_written=counts[_WRITTEN],
        requests={k: n for k, n in zip(KINDS, counts, strict=False) if n},
    )


# -- S3: botocore's events -----------------------------------------------------------------------
def _before_call(model: Any, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """Keep the size of an object's bytes being sent (a PUT's or a part's body)."""
    if model.name not in ("PutObject", "UploadPart"):
        return
    body = params.get("body")
    if isinstance(body, bytes | bytearray):
        context[_SENT] = len(body)
    elif body is not None and body.seekable():  # a file-like payload, sent from where it is
        here = body.tell()
        context[_SENT] = body.seek(0, io.SEEK_END) - here
        body.seek(here)


def _after_call(
    model: Any, http_response: Any, parsed: dict[str, Any], context: dict[str, Any], **_: Any
) -> None:
    read = 0
    if model.name == "GetObject" and http_response.status_code < 300:
        read = int(parsed.get("ContentLength", 0))
    count_request(_OPERATIONS.get(model.name, "other"), read=read, written=context.get(_SENT, 0))


def counted_session() -> Any:  # an aiobotocore AioSession, for s3fs's `session=`
    """A botocore session whose clients count every request the store answers."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.register("before-call.s3", _before_call)
    session.register("after-call.s3", _after_call)
    return session


class CountingReader(io.RawIOBase):
    """A local file's reads, counted as they happen."""

    def __init__(self, raw: Any) -> None:  # a binary file
        super().__init__()
        self._raw = raw

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._raw.seek(offset, whence))

    def tell(self) -> int:
        return int(self._raw.tell())

    def readinto(self, buffer: WriteableBuffer) -> int:
        n = int(self._raw.readinto(buffer))
        count_read(n)
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


# -- Ray: workers report, the driver's ledger sums ------------------------------------------------
class _Ledger:
    """The Ray workers' usage of one driver job, summed (a Ray actor on the driver's node)."""

    def __init__(self) -> None:
        self._total = Usage()

    def add(self, usage: Usage) -> None:
        self._total = self._total + usage

    def total(self) -> Usage:
        return self._total


_driver_ledger: Any = None  # the driver's handle: keeps the ledger alive as long as the driver
_ledger_job: str | None = None
_worker_ledger: Any = None
_reported = Usage()
_report_lock = threading.Lock()


def start_ledger(options: dict[str, Any]) -> None:
    """Start this driver's ledger (`options`: where to place it), once per Ray job (a new
    `ray.init` is a new job). Called once Ray is up."""
    global _driver_ledger, _ledger_job
    import ray

    context = ray.get_runtime_context()
    job = f"{context.get_node_id()}/{context.get_job_id()}"  # a new local cluster: a new node
    if job == _ledger_job:
        return
    _driver_ledger = (
        ray.remote(_Ledger).options(name=LEDGER, num_cpus=0, get_if_exists=True, **options).remote()
    )
    _ledger_job = job


def _ledger_total() -> Usage:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return Usage()
    try:
        ledger = ray.get_actor(LEDGER)
    except ValueError:  # Ray started without `ensure_ray`: its workers are not metered
        return Usage()
    total: Usage = ray.get(ledger.total.remote())
    return total


def report() -> None:
    """In a Ray worker: add what this process did since its last report to the driver's ledger.
    Elsewhere (a driver, a unit run in-process) nothing: the driver's meter sees it itself."""
    global _reported, _worker_ledger
    ray = _ray_worker()
    if ray is None:
        return
    with _report_lock:
        now = process_usage()
        if _worker_ledger is None:
            try:
                _worker_ledger = ray.get_actor(LEDGER)
            except ValueError:
                return
        ray.get(_worker_ledger.add.remote(now - _reported))
        _reported = now


def reported(fn: Callable[P, R]) -> Callable[P, R]:
    """Report this process's usage (`report`) when a unit of work ends, before its result goes
    back: for the functions and actor methods Ray runs a stage's work in."""

    @functools.wraps(fn)
    def unit(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            try:
                report()
            except Exception as err:  # noqa: BLE001 - a lost ledger must not fail the work
                log.warning("could not report this worker's usage: %s", err)

    return unit


class StageMeter:
    """One stage's usage: the driver process's share over the stage, plus what the Ray workers
    reported to the ledger meanwhile."""

    def __init__(self) -> None:
        self._process = process_usage()
        self._workers = _ledger_total()

    def stop(self) -> Usage:
        return (process_usage() - self._process) + (_ledger_total() - self._workers)
