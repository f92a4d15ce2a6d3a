"""One clear message for a failure, whichever layer wrapped it (Ray task, Ray Train worker group,
Prefect): the innermost errors are what the user can act on."""

from __future__ import annotations


def _inner(err: BaseException) -> list[BaseException]:
    """The errors `err` wraps: Ray Train's per-worker failures, Ray's task cause, `raise ... from`."""
    workers = getattr(err, "worker_failures", None)  # ray.train WorkerGroupError
    if isinstance(workers, dict) and workers:
        return [e for _, e in sorted(workers.items()) if isinstance(e, BaseException)]
    for name in ("controller_failure", "cause"):  # ray.train ControllerError, RayTaskError
        inner = getattr(err, name, None)
        if isinstance(inner, BaseException) and inner is not err:
            return [inner]
    return [err.__cause__] if err.__cause__ is not None else []


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
