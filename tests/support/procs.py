"""This process's own descendants, found through /proc with the walker of the product's watchdog
(flows/watchdog.py): a test kills one Ray worker of its own cluster (never one of another Ray
cluster on the machine), or checks that a killed run left nothing running. No psutil here."""

from __future__ import annotations

import os

from flows.watchdog import PROC, descendants, process_stat


def command_line(pid: int) -> bytes | None:
    """The command line of `pid` as /proc holds it (arguments NUL-separated; Ray titles a worker
    `ray::<task or actor>`), or None when it is gone."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None


def below(root: int | None = None) -> dict[int, bytes]:
    """pid -> command line of every living process below `root` (default: this process)."""
    out = {}
    for pid in descendants(os.getpid() if root is None else root):
        if (cmd := command_line(pid)) is not None:
            out[pid] = cmd
    return out


def titled(prefix: bytes, root: int | None = None) -> list[int]:
    """The processes below `root` (default: this process) whose command line starts with
    `prefix`, e.g. b"ray::SeedRangeSampler"."""
    return sorted(pid for pid, cmd in below(root).items() if cmd.startswith(prefix))


def outermost(pids: list[int]) -> list[int]:
    """Those of `pids` whose parent is not among them (a Ray worker, not its data-loading
    children, which share its title)."""
    parents = {pid: st.parent for pid in pids if (st := process_stat(pid)) is not None}
    return sorted(pid for pid, parent in parents.items() if parent not in parents)


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (dead, waiting to be reaped)."""
    st = process_stat(pid)
    return st is not None and st.state != "Z"
