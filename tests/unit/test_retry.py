"""One retry policy: transient errors are retried with capped backoff until a time budget is spent,
everything else fails at once, and wrapped errors (Ray, Prefect) are classified by their cause."""

from __future__ import annotations

import errno
import pickle

import aiohttp
import botocore.exceptions
import pytest

import tasks.retry
from tasks.retry import RetryBudgetSpent, is_transient, retry_transient


def test_transient_errors_are_retried_then_succeed() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retry_transient(flaky, budget_s=5, first_delay=0.001) == "ok" and len(calls) == 3


@pytest.mark.parametrize(
    "err",
    [
        FileNotFoundError("k"),
        PermissionError("denied"),
        ValueError("bad data"),
        OSError(errno.EINVAL, "InvalidArgument"),  # s3fs's mapping of a 400 answer
        botocore.exceptions.NoCredentialsError(),
    ],
)
def test_deterministic_errors_fail_at_once(err: Exception) -> None:
    calls = []

    def fails() -> None:
        calls.append(1)
        raise err

    with pytest.raises(type(err)):
        retry_transient(fails, budget_s=5, first_delay=0.001)
    assert len(calls) == 1


class FakeClock:
    """The clock `retry_transient` reads and sleeps on, where time passes only when it sleeps: its
    schedule is then exact, whatever else the machine is doing."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(tasks.retry, "time", fake)
    return fake


def test_the_budget_is_time_and_ends_with_the_last_error(clock: FakeClock) -> None:
    calls: list[float] = []

    def down() -> None:
        calls.append(clock.now)
        raise TimeoutError(f"read timed out ({len(calls)})")

    with pytest.raises(TimeoutError, match=r"read timed out \(\d+\)") as err:
        retry_transient(down, budget_s=0.5, first_delay=0.01, max_delay=0.04)
    assert str(err.value) == f"read timed out ({len(calls)})"  # the last error, not the first
    assert calls[0] == 0.0 and calls[-1] == pytest.approx(0.5)  # the last try at the deadline
    assert clock.now == calls[-1]  # and no pause after it
    # Each pause is drawn from [d/2, d], d doubling from 0.01 up to its cap of 0.04; the last one
    # is cut to the deadline. Uncapped, doubling would give ~6 tries; capped, there are >= 10.
    steps = [min(0.01 * 2**i, 0.04) for i in range(len(clock.sleeps))]
    assert all(d / 2 <= p <= d for p, d in zip(clock.sleeps[:-1], steps, strict=False))
    assert 0 < clock.sleeps[-1] <= steps[-1]
    assert len(calls) == len(clock.sleeps) + 1 and len(calls) >= 10


class Unavailable(RuntimeError, RetryBudgetSpent):
    """As the store's StorageUnavailableError."""


def test_a_spent_budget_raises_the_callers_error_from_the_last_one(clock: FakeClock) -> None:
    seen: list[tuple[Exception, int, float]] = []

    def give_up(err: Exception, attempts: int, seconds: float) -> Exception:
        seen.append((err, attempts, seconds))
        return Unavailable(f"down for {seconds:.1f} s after {attempts} attempts")

    def down() -> None:
        raise ConnectionRefusedError("refused")

    with pytest.raises(Unavailable, match="down for") as err:
        retry_transient(down, budget_s=0.1, first_delay=0.01, give_up=give_up)
    ((last, attempts, seconds),) = seen
    assert err.value.__cause__ is last and isinstance(last, ConnectionRefusedError)
    assert attempts >= 2 and seconds == pytest.approx(0.1)
    # For Prefect's stage retry a spent budget is transient, also after Ray pickled it (which
    # drops __cause__) ...
    assert is_transient(err.value)
    assert is_transient(pickle.loads(pickle.dumps(err.value)))

    # ... but an outer retry_transient does not retry it: budgets never nest.
    calls = []

    def inner_gave_up() -> None:
        calls.append(1)
        raise err.value

    with pytest.raises(Unavailable):
        retry_transient(inner_gave_up, budget_s=5, first_delay=0.001)
    assert len(calls) == 1


def test_a_zero_budget_tries_once() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        retry_transient(down, budget_s=0)
    assert len(calls) == 1


def test_the_s3_client_stacks_network_errors_are_transient() -> None:
    url = "http://127.0.0.1:9"
    # botocore raises EndpointConnectionError with aiohttp's error only as its __context__, and
    # none of these is a builtin ConnectionError.
    for err in [
        botocore.exceptions.EndpointConnectionError(endpoint_url=url),
        botocore.exceptions.ConnectTimeoutError(endpoint_url=url),
        botocore.exceptions.ReadTimeoutError(endpoint_url=url),
        botocore.exceptions.ConnectionClosedError(endpoint_url=url),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("response payload is not completed"),
        OSError(errno.EBUSY, "SlowDown"),  # s3fs's mapping of a 503 answer
    ]:
        assert is_transient(err), err
    assert not issubclass(botocore.exceptions.EndpointConnectionError, ConnectionError)
    assert not is_transient(botocore.exceptions.NoCredentialsError())
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))


def test_wrapped_errors_are_classified_by_their_cause() -> None:
    class WrapperError(Exception):  # as Ray's RayTaskError keeps the original in `.cause`
        def __init__(self, cause: BaseException):
            super().__init__(str(cause))
            self.cause = cause

    assert is_transient(WrapperError(ConnectionError("refused")))
    assert not is_transient(WrapperError(FileNotFoundError("gone")))
    try:
        try:
            raise TimeoutError("slow")
        except TimeoutError as inner:
            raise RuntimeError("stage failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)
    assert not is_transient(RuntimeError("no cause"))


def test_a_worker_group_error_is_classified_by_its_workers_errors() -> None:
    class WorkerGroupError(Exception):  # the shape of ray.train's: one error per worker rank
        def __init__(self, worker_failures: dict[int, Exception]):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = worker_failures

    assert is_transient(WorkerGroupError({0: ConnectionError("reset"), 1: ValueError("x")}))
    assert not is_transient(WorkerGroupError({0: ValueError("diverged")}))
