"""`diffpipe` run in the test process, for the tests of what the CLI says before any service
starts (--dry-run, --help, a refused config): the same `flows.cli.main` the console script calls,
without a Python, torch and Prefect import per call. What starts services (Ray, Prefect) is
tested through the real `diffpipe` process in tests/e2e/."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.runtime import PROCESS_DEFAULTS


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_cli(
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cwd: Path | None = None,
) -> CliRun:
    """`diffpipe ARGS` in this process, in `cwd`; argparse's exit (--help, a usage error) counts
    as the return code. The environment `main` sets for itself is restored after the test."""
    from flows.cli import main

    for name in PROCESS_DEFAULTS:  # main's setup_process() sets them: put back after the test
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    if cwd is not None:
        monkeypatch.chdir(cwd)
    capsys.readouterr()  # what the test printed before is not this run's
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return CliRun(code, out, err)
