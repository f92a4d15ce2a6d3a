"""Nothing outlives a `diffpipe` run: a detached watchdog process ends what the run left behind.

When the run ends, fails or is killed (SIGKILL included), the watchdog stops every process the run
started that is still alive (Prefect's temporary API server, a local Ray cluster and its workers)
and removes the run's temporary folders. It follows the run's descendants through /proc once a
second, and identifies a process by (pid, start time), so it never signals a process it did not see
descend from the run, but for one whose command line names the run's own temporary folders (a Ray
worker still starting when the run died). Where /proc does not exist, it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tasks.runtime import temp_prefix, temp_roots

PROC = Path("/proc")
GRACE_S = 5.0
SWEEP_S = 10.0  # how long the run's folders are removed again as they reappear


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


class ProcessStat(NamedTuple):
    """What /proc/<pid>/stat says of a process: its parent, its start time (clock ticks after
    boot; with the pid, it names the process, since pids are reused) and its state ("Z": a zombie,
    dead and waiting for its parent to reap it)."""

    parent: int
    start: int
    state: str


def process_stat(pid: int) -> ProcessStat | None:
    """The stat of `pid`, or None when it is gone (or /proc does not exist)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return ProcessStat(parent=int(fields[1]), start=int(fields[19]), state=fields[0])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := process_stat(int(entry.name))) is not None:
            tree.setdefault(st.parent, []).append(int(entry.name))
    return tree


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every living descendant of `root` (the tests find their own Ray
    workers with it too)."""
    tree, out, stack = _children(), {}, [root]
    while stack:
        for child in tree.get(stack.pop(), []):
            if (st := process_stat(child)) is not None:
                out[child] = st.start
                stack.append(child)
    return out


def _alive(pid: int, start: int) -> bool:
    st = process_stat(pid)
    return st is not None and st.start == start


def watch(pid: int, *, interval_s: float = 1.0) -> None:
    started = process_stat(pid)
    if started is None:
        return
    seen: dict[int, int] = {}
    while _alive(pid, started.start):
        seen |= descendants(pid)
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
    # A process the run started in its last second was never seen (a Ray worker the raylet
    # forked as the run was killed, orphaned since): still importing, it would make Ray's session
    # folders again (`session_*/{logs/old,sockets,runtime_resources}`, seen 27 s after a kill on
    # a loaded machine) and then exit. Its command line names the run's folders: it is ended
    # first, and the folders are removed again while one may still be starting.
    folders = [str(root / temp_prefix(pid)).encode() for root in temp_roots()]
    deadline = time.monotonic() + SWEEP_S
    while True:
        for p in _naming(folders):
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        for root in temp_roots():  # the temp folder, and Ray's where $RAY_TMPDIR sets it apart
            for folder in root.glob(temp_prefix(pid) + "*"):
                shutil.rmtree(folder, ignore_errors=True)
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)


def _naming(folders: list[bytes]) -> list[int]:
    """The processes whose command line names one of `folders` (a Ray worker's --temp-dir)."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(folder in cmdline for folder in folders):
                found.append(int(entry.name))
    return found


if __name__ == "__main__":
    watch(int(sys.argv[1]))
