#!/usr/bin/env bash
# GPU benchmarks in one command, on a machine with a CUDA GPU (see benchmarks/RESULTS.md):
#   bash benchmarks/gpu.sh            # full run (a few minutes, most of it torch.compile)
#   bash benchmarks/gpu.sh --quick    # smoke run
# 1. DDPM CIFAR-10 network (35.7M params): train img/s and MFU (bf16, channels_last, compile),
#    DDIM sampling img/s, Inception extraction img/s -> results/train_gpu.md
# 2. our UNet vs diffusers' UNet2DModel, one training step, same settings -> results/train_step_gpu.md
# 3. our sampler vs diffusers' DDIMScheduler loop, same network -> results/sampling_gpu.md
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
run() { python3 -m uv run --locked python "$@"; }
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run -m benchmarks.bench_train_gpu --device cuda "${quick[@]}"
steps=(--reps 20)
[[ ${#quick[@]} -gt 0 ]] && steps=(--reps 2 --warmup 1)
run -m benchmarks.bench_train_step --device cuda --bf16 --channels-last --compile --batch 128 \
  --image-size 32 --in-channels 3 --base-channels 128 --channel-mult 1 2 2 2 --num-res-blocks 2 \
  --attention-resolutions 16 --groups 32 "${steps[@]}" --out train_step_gpu.md
run -m benchmarks.bench_sampling --device cuda --bf16 --channels-last --compile --batch 256 \
  --image-size 32 --base-channels 128 --reps "${steps[1]}" --out sampling_gpu.md
