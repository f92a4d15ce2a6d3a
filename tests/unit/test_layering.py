"""Imports point one way: flows -> tasks -> diffusion_core; the core knows nothing of Prefect or Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    offenders = {f.name: sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in offenders.items() if v}, offenders
