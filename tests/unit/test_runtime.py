"""Importing the project changes nothing outside it; `setup_process()` makes the process settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tasks.runtime import PROCESS_DEFAULTS
from tests.support.paths import REPO


def test_imports_have_no_side_effects_and_setup_is_explicit() -> None:
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_DEFAULTS}
    names = sorted(PROCESS_DEFAULTS)
    code = "\n".join(
        [
            "import json, os, sys",
            # third-party packages set their own variables on import (torch's inductor cache)
            "import torch, prefect, webdataset, fsspec, torch_fidelity",
            "before = dict(os.environ)",
            "import flows.cli, flows.nightly, flows.stages, flows.deploy, tasks.train.stage, tasks.sample.stage",
            "changed = {k: v for k, v in os.environ.items() if before.get(k) != v}",
            "g = sys.modules['webdataset.gopen']",
            "from tasks.runtime import setup_process",
            "setup_process()",
            f"after = {{k: os.environ.get(k) for k in {names!r}}}",
            "schemes = sorted(g.gopen_schemes)",
            "print(json.dumps({'changed': changed, 'after': after, 'schemes': schemes}))",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["changed"] == {}
    assert result["after"] == PROCESS_DEFAULTS
    assert "s3" not in result["schemes"]  # no process-wide webdataset opener is registered
