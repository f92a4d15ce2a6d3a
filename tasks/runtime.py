"""Process-wide settings, made in one explicit call: `setup_process()`.

Importing any module of this project changes nothing outside it. The CLI calls `setup_process()`
first thing, `ensure_ray` calls it before Ray is imported, and a flow run calls it when it starts
(a Prefect worker imports our flows itself). Settings already in the environment win.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

PROCESS_DEFAULTS = {
    # Our modules log through `logging`; Prefect forwards these loggers to the run logs. Read when
    # Prefect is imported: a worker that imports Prefect first needs it in its own environment.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,flows",
    # The embedded default runs on Prefect's ephemeral API; on a busy 2-core machine its start can
    # take longer than Prefect's 20 s default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Under `uv run`, Ray would start every worker with `uv run` in a copy of the working directory
    # (a fresh environment per job); our workers use this interpreter and its packages.
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


def setup_process() -> None:
    """Set this process's defaults (idempotent); call before Prefect or Ray are imported."""
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)


def temp_prefix(pid: int | None = None) -> str:
    """Name prefix of the temporary folders process `pid` makes (flows/watchdog.py removes them
    when that process is gone)."""
    return f"diffpipe-{pid or os.getpid()}-"


def ray_temp_root() -> Path:
    """Where a local Ray cluster's temporary folder goes: where Ray itself would put it ($RAY_TMPDIR,
    else $TMPDIR on Linux, else /tmp), a short path, as Ray's Unix socket paths below it must stay
    under 108 bytes (macOS's $TMPDIR is too long for them)."""
    if os.environ.get("RAY_TMPDIR"):
        return Path(os.environ["RAY_TMPDIR"])
    return Path(tempfile.gettempdir() if sys.platform.startswith("linux") else "/tmp")


def temp_roots() -> list[Path]:
    """The folders a process's temporary folders (named with `temp_prefix`) are made in."""
    return list(dict.fromkeys([Path(tempfile.gettempdir()), ray_temp_root()]))
