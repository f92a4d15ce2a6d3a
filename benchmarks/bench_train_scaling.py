"""Data-parallel scaling on CPU: Ray Train with 2 workers of 1 CPU each against 1 worker of 1 CPU.

The same per-worker batch (so 2 workers train twice the images per step), the same data, the same
model; a local Ray cluster of 2 CPUs. Images/s is the median of each run's logging windows after
the first (`runs/<id>/logs/history.json`), summed over the ranks. Runs alternate (1, 2, 2, 1, ...).
Needs 2 otherwise idle cores: on a busy machine the 2-worker run is the one that loses.

Two configs (`--config`): `quickstart` (`digits` 8x8, the default 0.76 M-parameter model: ~0.1 s
a step, so the gradient all-reduce and each rank's data process weigh on 1 core) and `mnist` (the
end-to-end benchmark's MNIST 28x28, 1.19 M parameters: ~1 s a step).

    uv run python -m benchmarks.bench_train_scaling
    uv run python -m benchmarks.bench_train_scaling --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks._common import mnist_settings, write_results
from tasks import layout
from tasks.config import PipelineConfig, resolve_config
from tasks.records import TrainHistory
from tasks.runtime import setup_process
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.stage import train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["quickstart", "mnist", "both"], default="both")
    p.add_argument("--steps", type=int, help="per run (default: quickstart 300, mnist 60)")
    p.add_argument("--reps", type=int, default=2, help="runs per worker count")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="train_scaling.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    return args


CONFIGS: dict[str, dict[str, object]] = {
    "quickstart": {"steps": 300, "log_every": 50, "overrides": {}},
    "mnist": {"steps": 60, "log_every": 10, "overrides": mnist_settings(4000)},
}


def measure(name: str, args: argparse.Namespace, root: Path) -> dict[int, list[float]]:
    spec = CONFIGS[name]
    steps = args.steps or spec["steps"]
    if args.quick:
        steps = max(20, int(steps) // 5)
    log_every = max(5, int(steps) // 6)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(1 if args.quick else args.reps):
        for workers in (1, 2) if rep % 2 == 0 else (2, 1):
            run_id = f"{name}-{rep}-{workers}"
            settings = {
                "storage": {"root": str(root)},
                "train": {
                    "run_id": run_id,
                    "steps": steps,
                    "log_every": log_every,
                    "checkpoint_every": steps,
                    "workers": workers,
                    "cpus_per_worker": 1,
                },
                "ray": {"num_cpus": 2},
                **spec["overrides"],  # type: ignore[dict-item]
            }
            cfg = resolve_config(PipelineConfig.model_validate(settings))
            store = Store(cfg.storage)
            train(cfg, store, shard_dataset(cfg.data, store).manifest)
            windows = TrainHistory.read(store, layout.train_history(run_id)).windows
            rates[workers].append(statistics.median(w.images_per_s for w in windows[1:]))
            print(f"{name}, {workers} worker(s): {rates[workers][-1]:.0f} img/s", flush=True)
    return rates


def main() -> None:
    args = parse_args()
    setup_process()
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    load_before = os.getloadavg()[0]
    names = ["quickstart", "mnist"] if args.config == "both" else [args.config]
    rows = []
    for name in names:
        rates = measure(name, args, root)
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        print(
            f"scaling, {name}: 1 worker {one:.0f} img/s, 2 workers {two:.0f}, ratio {two / one:.2f}"
        )
        rows.append(
            f"| {name} | {', '.join(f'{r:.0f}' for r in rates[1])} | "
            f"{', '.join(f'{r:.0f}' for r in rates[2])} | **{two / one:.2f}** |"
        )
    load_after = os.getloadavg()[0]
    body = "\n".join(
        [
            "Batch 64 per worker, local Ray with 2 CPUs, 1 CPU (1 torch thread) and 1 data process "
            "per worker. `quickstart`: `digits` 8x8, the default model, 300 steps per run. "
            "`mnist`: MNIST test set 28x28 (4,000 images), base 32, mult 1-2-2, attention at 7x7 "
            f"(1.19 M parameters), 60 steps per run. 1-minute load average {load_before:.2f} "
            f"before, {load_after:.2f} after.",
            "",
            "| config | 1 worker: images/s (median window, each run) | 2 workers: images/s, all "
            "ranks | ratio 2 / 1 |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    path = write_results(args.out, "Data-parallel scaling (CPU)", "cpu", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
