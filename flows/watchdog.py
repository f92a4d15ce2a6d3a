"""Nothing outlives a `diffpipe` run: a detached watchdog process ends what the run left behind.

When the run ends, fails or is killed (SIGKILL included), the watchdog stops every process the run
started that is still alive (Prefect's temporary API server, a local Ray cluster and its workers)
and removes the run's temporary folders. It follows the run's descendants through /proc once a
second, and identifies a process by (pid, start time), so it never signals a process it did not see
descend from the run. Where /proc does not exist, it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.runtime import temp_prefix

PROC = Path("/proc")
GRACE_S = 5.0


def start_watchdog() -> None:
    """Watch this process from a detached child (its own session, so a kill of this process's
    group does not take it along)."""
    if not PROC.is_dir():
        return
    subprocess.Popen(
        [sys.executable, "-m", "flows.watchdog", str(os.getpid())],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of `pid`, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return int(fields[1]), int(fields[19])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            tree.setdefault(st[0], []).append(int(entry.name))
    return tree


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every living descendant of `root`."""
    tree, out, stack = _children(), {}, [root]
    while stack:
        for child in tree.get(stack.pop(), []):
            if (st := _stat(child)) is not None:
                out[child] = st[1]
                stack.append(child)
    return out


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start


def watch(pid: int, *, interval_s: float = 1.0) -> None:
    started = _stat(pid)
    if started is None:
        return
    seen: dict[int, int] = {}
    while _alive(pid, started[1]):
        seen |= _descendants(pid)
        seen.pop(os.getpid(), None)  # the watchdog descends from the run too
        seen = {p: s for p, s in seen.items() if _alive(p, s)}
        time.sleep(interval_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = {p: s for p, s in seen.items() if _alive(p, s)}
        for p in left:
            with contextlib.suppress(OSError):
                os.kill(p, sig)
        deadline = time.monotonic() + GRACE_S
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = {p: s for p, s in left.items() if _alive(p, s)}
        if not left:
            break
    for folder in Path(tempfile.gettempdir()).glob(temp_prefix(pid) + "*"):
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
