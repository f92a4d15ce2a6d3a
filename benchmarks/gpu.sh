#!/usr/bin/env bash
# The GPU check in one command, on a machine with a CUDA GPU (README "GPU check"; results in
# benchmarks/results/train_gpu.md and benchmarks/RESULTS.md):
#   bash benchmarks/gpu.sh            # full run, under 8 minutes (much of it torch.compile)
#   bash benchmarks/gpu.sh --quick    # smoke run
# Without a CUDA GPU it says so and exits 2.
#
# It runs where nothing can be installed (no network, no uv). The interpreter is
#   1. $DIFFPIPE_PYTHON, when set;
#   2. uv's locked environment, when uv can sync it (offline from uv's cache first, then online);
#   3. otherwise the machine's python3, which needs only a CUDA build of torch and numpy: the GPU
#      benchmark imports nothing else (tests/unit/test_gpu_check.py checks that), so no wheels
#      need carrying.
# Parts that need more run where their packages import and say "skipped" otherwise: Inception
# extraction (the evaluate stage: pydantic, fsspec, torch-fidelity), `pytest -m gpu` (pytest), and
# the comparisons with diffusers (diffusers; only while the run is within its 8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)

uv=()
if command -v uv >/dev/null 2>&1; then
  uv=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  uv=(python3 -m uv)
fi
if [[ -n "${DIFFPIPE_PYTHON:-}" ]]; then
  py=("$DIFFPIPE_PYTHON")
  env_name="\$DIFFPIPE_PYTHON ($DIFFPIPE_PYTHON)"
elif [[ ${#uv[@]} -gt 0 ]] && "${uv[@]}" run --locked --offline python -c "" >/dev/null 2>&1; then
  py=("${uv[@]}" run --locked --offline python)
  env_name="uv's locked environment (synced offline)"
elif [[ ${#uv[@]} -gt 0 ]] && UV_HTTP_TIMEOUT=30 timeout 600 "${uv[@]}" run --locked python -c "" \
  >/dev/null 2>&1; then
  py=("${uv[@]}" run --locked python)
  env_name="uv's locked environment"
else
  py=(python3)
  env_name="the machine's python3 ($(command -v python3)): uv ${uv[*]:-absent} could not sync"
fi
echo "gpu.sh: python: $env_name"

check_cuda='
import sys
try:
    import torch
except ImportError as err:
    sys.exit(f"benchmarks/gpu.sh needs torch (a CUDA build) and numpy in {sys.executable}: {err}")
if not torch.cuda.is_available():
    sys.exit(
        f"benchmarks/gpu.sh needs a CUDA GPU: torch {torch.__version__} in {sys.executable} "
        f"(CUDA build: {torch.version.cuda}) sees none. Run it on a machine with an NVIDIA GPU and "
        "its driver. To check the scripts on a CPU: python -m benchmarks.bench_train_gpu "
        "--device cpu --quick --no-compile --network tiny"
    )
print(f"gpu.sh: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
'
if ! "${py[@]}" -c "$check_cuda"; then
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
has() { "${py[@]}" -c "import $1" >/dev/null 2>&1; }

# 1. Training img/s and MFU, exact resume, bf16 vs fp32, sampling per NFE, extraction, memory.
DIFFPIPE_GPU_ENV="$env_name" "${py[@]}" -m benchmarks.bench_train_gpu --device cuda "${quick[@]}"

# 2. The GPU tests (tests/gpu; tests/conftest.py, with its S3 and Ray fixtures, is not loaded).
if has pytest; then
  "${py[@]}" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --confcutdir=tests/gpu
else
  echo "gpu.sh: skipped pytest -m gpu: pytest is not installed in this python"
fi

# 3. Our UNet and sampler against diffusers' at this size (each compiles two networks).
if ! has diffusers; then
  echo "gpu.sh: skipped the comparisons with diffusers: diffusers is not installed in this python"
elif [[ ${#quick[@]} -eq 0 && $SECONDS -gt 240 ]]; then
  echo "gpu.sh: skipped the comparisons with diffusers: ${SECONDS} s gone, they would pass 8 minutes"
else
  steps=(--reps 20)
  [[ ${#quick[@]} -gt 0 ]] && steps=(--reps 2 --warmup 1)
  "${py[@]}" -m benchmarks.bench_train_step --device cuda --bf16 --channels-last --compile \
    --batch 128 --image-size 32 --in-channels 3 --base-channels 128 --channel-mult 1 2 2 2 \
    --num-res-blocks 2 --attention-resolutions 16 --groups 32 "${steps[@]}" --out train_step_gpu.md
  "${py[@]}" -m benchmarks.bench_sampling --device cuda --bf16 --channels-last --compile \
    --batch 256 --image-size 32 --base-channels 128 --reps "${steps[1]}" --out sampling_gpu.md
fi
echo "gpu.sh: ${SECONDS} s in all"
