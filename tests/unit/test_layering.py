"""Imports point one way: flows -> tasks -> diffusion_core; the core knows nothing of Prefect or Ray.

Inside tasks/, each stage is a folder (`tasks/<stage>/`, entered through `stage.py`) and the
platform is `tasks/*.py`. The platform never imports a stage, and a stage imports no other stage,
except that a stage may import the report's document model (`tasks.report.document`) to render
what it produced.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tasks"
FORBIDDEN = {
    "diffusion_core": {
        "prefect",
        "ray",
        "tasks",
        "flows",
        "diffusers",
        "webdataset",
        "fsspec",
        "s3fs",
    },
    "tasks": {"prefect", "flows"},
}
STAGES = sorted(p.name for p in TASKS.iterdir() if (p / "stage.py").is_file())
# What a stage may import from another stage: the report's rendering blocks.
SHARED_STAGE_MODULES = {"tasks.report.document"}


def _modules(path: Path) -> set[str]:
    """The absolute module names a file imports (`from a.b import c` gives `a.b` and `a.b.c`)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "tasks" and parts[1] in STAGES:
        return parts[1]
    return None


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    offenders = {
        str(f.relative_to(REPO)): sorted(
            {m.split(".")[0] for m in _modules(f)} & FORBIDDEN[package]
        )
        for f in files
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_every_stage_is_a_folder_entered_through_stage_py():
    assert STAGES == [
        "evaluate",
        "promote",
        "report",
        "retention",
        "sample",
        "shard",
        "sweep",
        "train",
    ]
    for stage in STAGES:
        # No re-exporting faces: a stage's __init__.py is empty.
        assert (TASKS / stage / "__init__.py").read_text().strip() == "", stage


def test_the_platform_imports_no_stage():
    offenders = {
        f.name: sorted(m for m in _modules(f) if _stage_of(m)) for f in sorted(TASKS.glob("*.py"))
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_a_stage_imports_no_other_stage():
    offenders = {}
    for stage in STAGES:
        for f in sorted((TASKS / stage).rglob("*.py")):
            bad = sorted(
                m
                for m in _modules(f)
                if _stage_of(m) not in (None, stage)
                and not any(m == s or m.startswith(s + ".") for s in SHARED_STAGE_MODULES)
            )
            if bad:
                offenders[str(f.relative_to(REPO))] = bad
    assert not offenders, offenders


def test_the_rule_can_fail(tmp_path):
    """The checks above see a violating import (guards against a rule that reads nothing)."""
    bad = tmp_path / "x.py"
    bad.write_text("from tasks.sample.stage import sample_images\nimport tasks.train.loop\n")
    assert {_stage_of(m) for m in _modules(bad)} == {"sample", "train"}
