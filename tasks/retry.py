"""The one retry policy: which failures are transient, and how often and how patiently to retry them.

Layers, each with its own job, so retries do not multiply:
- object-store calls retry transient I/O here (`retry_transient`, `STORE_ATTEMPTS` tries with
  exponential backoff), the only place that retries an I/O error;
- Ray re-runs a task or restarts a worker only when its *process* died (`max_retries` for system
  failures, `retry_exceptions=False`): an application error was already retried by the store;
- Prefect re-runs a whole stage (`STAGE_RETRIES`) only when `is_transient` says its error was
  transient, i.e. the store's own retries ran out during an outage; stages are idempotent.
A deterministic failure (bad config, missing key, bad data) is never retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

STORE_ATTEMPTS = 4
STORE_FIRST_DELAY_S = 0.5
STAGE_RETRIES = 1
STAGE_RETRY_DELAY_S = 30.0

# The network and the store's transient answers. s3fs maps throttling, 5xx answers and dropped
# connections to OSError subclasses; the subclasses below are answers that will not change.
_TRANSIENT = (ConnectionError, TimeoutError, OSError)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(err: BaseException) -> bool:
    """True when `err`, or an error it was raised from (Ray and Prefect wrap errors), is transient."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _PERMANENT):
            return False
        if isinstance(current, _TRANSIENT):
            return True
        cause = getattr(current, "cause", None)  # ray.exceptions.RayTaskError keeps it here
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return False


def retry_transient(
    fn: Callable[[], T],
    *,
    attempts: int = STORE_ATTEMPTS,
    first_delay: float = STORE_FIRST_DELAY_S,
) -> T:
    """Run `fn`, retrying transient errors with exponential backoff; others propagate at once."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts - 1 or not is_transient(err):
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
