"""One retry policy: transient errors are retried with backoff, everything else fails at once, and
wrapped errors (Ray, Prefect) are classified by their cause."""

from __future__ import annotations

import pytest

from tasks.retry import is_transient, retry_transient


def test_transient_errors_are_retried_then_succeed() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert retry_transient(flaky, first_delay=0.001) == "ok" and len(calls) == 3


@pytest.mark.parametrize(
    "err", [FileNotFoundError("k"), PermissionError("denied"), ValueError("bad data")]
)
def test_deterministic_errors_fail_at_once(err: Exception) -> None:
    calls = []

    def fails() -> None:
        calls.append(1)
        raise err

    with pytest.raises(type(err)):
        retry_transient(fails, first_delay=0.001)
    assert len(calls) == 1


def test_the_retry_budget_ends_with_the_last_error() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError):
        retry_transient(down, attempts=3, first_delay=0.001)
    assert len(calls) == 3


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
