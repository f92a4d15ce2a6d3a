"""The GPU tests (`pytest -m gpu`): every test here is marked `gpu` and skipped, with the reason,
where torch sees no CUDA GPU. They need torch, numpy and pytest only (`benchmarks/gpu.sh` runs them
with `--confcutdir=tests/gpu`, so tests/conftest.py and its S3 and Ray fixtures are not loaded)."""

from __future__ import annotations

import os

import pytest
import torch

# cuBLAS reads this when it starts: the deterministic checks need it set before any CUDA work.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

NO_CUDA = (
    f"needs a CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none; "
    "run `bash benchmarks/gpu.sh` on a GPU machine"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason=NO_CUDA))
