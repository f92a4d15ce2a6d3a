"""The GPU check on a machine without a GPU: `benchmarks/gpu.sh` refuses clearly, and the GPU
benchmark imports nothing but torch, numpy and this repository (what a bare GPU machine has), which
is checked by running it with the project's other dependencies made unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.paths import REPO

# The project's dependencies besides torch and numpy, its own upper layers, and tqdm and colorama
# (which torch imports if they are there): none may be needed.
BLOCKED = (
    "ray", "prefect", "pydantic", "webdataset", "yaml", "fsspec", "s3fs", "torch_fidelity",
    "diffusers", "scipy", "sklearn", "PIL", "torchvision", "pyarrow", "matplotlib", "tensorboard",
    "fastapi", "sqlalchemy", "boto3", "moto", "tqdm", "colorama", "tasks", "flows",
)  # fmt: skip
# Runs the benchmark as `python -m` would, with BLOCKED unimportable (None in sys.modules makes
# `import x` raise ModuleNotFoundError), then reports the top-level modules it loaded.
RUNNER = """
import json, runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = ["bench_train_gpu", *{argv!r}]
try:
    runpy.run_module("benchmarks.bench_train_gpu", run_name="__main__", alter_sys=True)
finally:
    loaded = sorted({{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}})
    print("LOADED " + json.dumps(loaded))
"""
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def run_bench(*argv: str) -> subprocess.CompletedProcess[str]:
    code = RUNNER.format(blocked=BLOCKED, argv=list(argv))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def loaded_modules(out: str) -> list[str]:
    line = next(x for x in out.splitlines() if x.startswith("LOADED "))
    return list(json.loads(line.removeprefix("LOADED ")))


def torch_closure() -> set[str]:
    """Distributions torch needs (recursively): a machine with a CUDA torch has them all."""
    from importlib.metadata import PackageNotFoundError, requires

    seen: set[str] = set()
    todo = ["torch", "numpy"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" not in req:
                todo.append(
                    req.split(";")[0]
                    .split("[")[0]
                    .split("<")[0]
                    .split(">")[0]
                    .split("=")[0]
                    .split("~")[0]
                    .split("!")[0]
                    .strip()
                )
    return seen


def third_party_outside_torch(loaded: list[str]) -> list[str]:
    """The loaded top-level modules that come from an installed distribution other than torch,
    numpy, their own dependencies and this project."""
    from importlib.metadata import packages_distributions

    allowed = torch_closure() | {"diffusion-pipeline"}
    dists = packages_distributions()
    own = {"benchmarks", "diffusion_core", "tests"}  # this checkout's, whatever else is installed
    return [
        m
        for m in loaded
        if m not in own
        and dists.get(m)
        and not any(d.lower().replace("_", "-") in allowed for d in dists[m])
    ]


@no_cuda
def test_bench_without_cuda_says_it_needs_cuda_after_its_imports() -> None:
    result = run_bench("--device", "cuda", "--quick")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs a CUDA GPU" in result.stderr
    assert third_party_outside_torch(loaded_modules(result.stdout)) == []


def test_bench_runs_every_part_with_torch_and_numpy_alone(tmp_path: Path) -> None:
    """The whole script on a CPU with a tiny network: the bitwise resume check passes, bf16 and
    fp32 are compared, sampling runs, and extraction is skipped with its reason."""
    out = tmp_path / "gpu_check.md"
    result = run_bench(
        "--device",
        "cpu",
        "--network",
        "tiny",
        "--quick",
        "--batch",
        "4",
        "--no-compile",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    assert "bitwise equal (weights, EMA, AdamW, 2 losses)" in text
    assert "bf16 vs fp32" in text and "last loss fp32" in text
    assert "dpmpp_2m 5 steps = 5 NFE" in text
    assert "skipped: the evaluate stage's dependencies are not installed" in text
    assert third_party_outside_torch(loaded_modules(result.stdout)) == []


@no_cuda
@pytest.mark.parametrize("python", ["uv or python3", "bare python3"])
def test_gpu_sh_without_cuda_says_so_and_fails(python: str) -> None:
    env = dict(os.environ)
    if python == "bare python3":  # this environment's interpreter, without uv
        env["DIFFPIPE_PYTHON"] = sys.executable
    result = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "benchmarks/gpu.sh needs a CUDA GPU" in result.stderr
    assert "bench_train_gpu" not in result.stdout  # stopped before any benchmark
