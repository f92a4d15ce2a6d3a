"""The one retry policy: which failures are transient, and how often and how patiently to retry them.

Layers, each with its own job, so retries do not multiply:
- object-store calls retry transient I/O here (`retry_transient`): exponential backoff, each pause
  drawn from [d/2, d] with d = 0.5 s doubling up to 8 s, until a time budget is spent
  (`storage.retry_budget_s`, which the store passes). Then the caller's `give_up` error is raised
  (the store's `StorageUnavailableError`, naming the endpoint). This is the only place that
  waits out an outage: the store turns botocore's own retries off (s3fs's quick ones for a
  dropped connection, under 2 s of pauses, stay), and an error that already spent a budget
  (`RetryBudgetSpent`) is never retried again by an outer `retry_transient`;
- Ray re-runs a task or restarts a worker only when its *process* died (`max_retries` for system
  failures, `retry_exceptions=False`): an application error was already retried by the store;
- Prefect re-runs a whole stage (`STAGE_RETRIES`) only when `is_transient` says its error was
  transient. A spent budget counts as transient here, on purpose: the stage is idempotent, so one
  more try `STAGE_RETRY_DELAY_S` later rides out an outage that outlasted the store's budget, and
  if that fails too, the user gets the same clear error.
A deterministic failure (bad config, missing key, bad data, refused credentials) is never retried.

What is transient: connection refused, reset or closed, timeouts, throttling and 5xx answers (s3fs
maps those to OSError), whether raised as builtins or as botocore's and aiohttp's own classes, which
are not builtin ConnectionErrors (botocore's EndpointConnectionError keeps aiohttp's error only as
its `__context__`). They are recognised by name along the class's MRO, so neither library is
imported here. An OSError whose errno is an answer (s3fs's EINVAL/EPERM for a 4xx, ENOSPC) is not.
Wrapped errors (Ray's `.cause`, `raise ... from`) are classified by their cause; a spent budget is
transient by its type, since Ray's pickling drops `__cause__`.
"""

from __future__ import annotations

import errno
import http.client
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

STORE_FIRST_DELAY_S = 0.5
STORE_MAX_DELAY_S = 8.0
# A connection attempt to an endpoint that drops packets (rather than refusing) gives up after
# this long, so that one attempt cannot overshoot the budget by botocore's default 60 s.
STORE_CONNECT_TIMEOUT_S = 10.0
STAGE_RETRIES = 1
STAGE_RETRY_DELAY_S = 30.0

_TRANSIENT = (ConnectionError, TimeoutError, http.client.IncompleteRead, OSError)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# OSErrors that are answers, not accidents: s3fs maps 4xx answers to EINVAL/EPERM/ENOSYS and
# redirects to EREMCHG; a local disk says ENOSPC or EROFS. Waiting changes none of them.
_PERMANENT_ERRNOS = frozenset(
    {
        errno.EINVAL,
        errno.EPERM,
        errno.EACCES,
        errno.ENOSYS,
        errno.ENOSPC,
        errno.EROFS,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        getattr(errno, "EREMCHG", 78),
    }
)
# The network errors of the S3 client stack that are not OSErrors, as "module.Class".
_TRANSIENT_CLASSES = frozenset(
    {
        "botocore.exceptions.ConnectionError",  # EndpointConnectionError, ConnectTimeoutError
        "botocore.exceptions.HTTPClientError",  # ConnectionClosedError, ReadTimeoutError
        "botocore.exceptions.IncompleteReadError",
        "aiohttp.client_exceptions.ClientConnectionError",  # ServerDisconnectedError, timeouts
        "aiohttp.client_exceptions.ClientPayloadError",
    }
)


class RetryBudgetSpent(Exception):
    """Base of the errors a `give_up` raises: transient errors went on for the whole budget.

    `is_transient` says True, for the stage retry; `retry_transient` does not retry it, so budgets
    never nest."""


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and the errors it wraps: Ray keeps the original in `.cause`, `raise from` in
    `__cause__`."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__


def _is_named_transient(err: BaseException) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in _TRANSIENT_CLASSES for c in type(err).__mro__)


def is_transient(err: BaseException) -> bool:
    """True when `err`, or an error it was raised from (Ray and Prefect wrap errors, and Ray Train
    keeps each worker's error apart), is transient."""
    from tasks.errors import root_causes  # no import cycle: errors imports nothing of ours

    return any(_transient_chain(e) for e in [err, *root_causes(err)])


def _transient_chain(err: BaseException) -> bool:
    for current in _chain(err):
        if isinstance(current, _PERMANENT) or (
            isinstance(current, OSError) and current.errno in _PERMANENT_ERRNOS
        ):
            return False
        if isinstance(current, _TRANSIENT) or _is_named_transient(current):
            return True
        if isinstance(current, RetryBudgetSpent):
            return True  # by its type, not only its cause: pickling (Ray) drops `__cause__`
    return False


def retry_transient(
    fn: Callable[[], T],
    *,
    budget_s: float,
    what: str = "an object-store call",
    give_up: Callable[[Exception, int, float], Exception] | None = None,
    first_delay: float = STORE_FIRST_DELAY_S,
    max_delay: float = STORE_MAX_DELAY_S,
) -> T:
    """Run `fn`; retry transient errors with capped exponential backoff until `budget_s` seconds
    have passed since the first try (the last try starts at the deadline; 0 = one try).

    Other errors propagate at once. When the budget is spent, `give_up(last_error, attempts,
    seconds)` is raised from the last error, or the last error itself when `give_up` is None.
    `what` names the call in the log ("writing s3://bucket/key").
    """
    start = time.monotonic()
    delay = first_delay
    attempts = 0
    while True:
        attempts += 1
        try:
            result = fn()
        except Exception as err:
            if not is_transient(err) or any(isinstance(e, RetryBudgetSpent) for e in _chain(err)):
                raise
            elapsed = time.monotonic() - start
            left = budget_s - elapsed
            if left <= 0:
                if give_up is None:
                    raise
                raise give_up(err, attempts, elapsed) from err
            if attempts == 1:
                log.warning(
                    "%s failed (%s: %s); retrying for up to %.0f s",
                    what,
                    type(err).__name__,
                    err,
                    budget_s,
                )
            # Jitter, so that the workers that lost the store together do not return in lockstep.
            time.sleep(min(delay * random.uniform(0.5, 1.0), left))
            delay = min(delay * 2, max_delay)
        else:
            if attempts > 1:
                log.warning(
                    "%s succeeded after %d attempts (%.1f s)",
                    what,
                    attempts,
                    time.monotonic() - start,
                )
            return result
