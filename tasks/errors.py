"""One clear message for a failure, whichever layer wrapped it (Ray task, Ray Train worker group,
Prefect): the errors the project raised are what the user can act on.

Wrappers are unwrapped down to the first error this project raised itself: `raise
StorageCredentialsError("no S3 credentials found ...") from NoCredentialsError` is described by its
own message, not by botocore's, and a checkpoint the weights-only loader refused by ours, never by
PyTorch's advice to load it unsafely. A library's error that wraps another (no project error in
between) is followed to its innermost cause, as before.
"""

from __future__ import annotations

from pathlib import Path

# The project's packages: an error raised from a file below one of these is the project's own.
_OURS = tuple(
    str(Path(__file__).resolve().parents[1] / name) for name in ("tasks", "flows", "diffusion_core")
)


def _raised_by_us(err: BaseException) -> bool:
    """Whether `err` was raised in the project's code: its traceback's innermost frame is ours
    (an error that crossed a process has no traceback: then its type's module decides)."""
    tb = err.__traceback__
    if tb is None:
        return type(err).__module__.startswith(("tasks", "flows", "diffusion_core"))
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_OURS)


def _inner(err: BaseException) -> list[BaseException]:
    """The errors `err` wraps: Ray Train's per-worker failures, Ray's task cause, `raise ... from`."""
    workers = getattr(err, "worker_failures", None)  # ray.train WorkerGroupError
    if isinstance(workers, dict) and workers:
        return [e for _, e in sorted(workers.items()) if isinstance(e, BaseException)]
    for name in ("controller_failure", "cause"):  # ray.train ControllerError, RayTaskError
        inner = getattr(err, name, None)
        if isinstance(inner, BaseException) and inner is not err:
            return [inner]
    if err.__cause__ is None or _raised_by_us(err):  # our message already says what to do
        return []
    return [err.__cause__]


def root_causes(err: BaseException) -> list[BaseException]:
    """The innermost errors of `err`, each once (several workers often fail the same way)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        inner = _inner(current)
        if inner:
            stack.extend(inner)
        else:
            out.append(current)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    # Ray prefixes a remote error's text with its traceback; the message is the last line.
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1]
    return text or type(err).__name__


def describe_failure(err: BaseException) -> str:
    """One line per distinct root cause, the error's type named when it is not ours."""
    lines: list[str] = []
    for cause in root_causes(err):
        text = _first_line(cause)
        ours = type(cause).__module__.startswith(("tasks", "flows", "diffusion_core"))
        line = (
            text
            if ours or isinstance(cause, OSError | ValueError)
            else f"{type(cause).__name__}: {text}"
        )
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)
