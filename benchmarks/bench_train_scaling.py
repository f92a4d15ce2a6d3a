"""Data-parallel scaling on CPU: Ray Train with 2 workers of 1 CPU each against 1 worker of 1 CPU.

The same per-worker batch (so 2 workers train twice the images per step), the same data (`digits`
shards), the same model; a local Ray cluster of 2 CPUs. Images/s is the median of each run's
logging windows after the first (`runs/<id>/logs/history.json`), summed over the ranks. Runs
alternate (1, 2, 2, 1, ...). Needs 2 otherwise idle cores: on a busy machine the 2-worker run is
the one that loses.

    uv run python benchmarks/bench_train_scaling.py
    uv run python benchmarks/bench_train_scaling.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_results  # noqa: E402
from tasks import layout  # noqa: E402
from tasks.config import PipelineConfig, resolve_config  # noqa: E402
from tasks.records import TrainHistory  # noqa: E402
from tasks.shard import shard_dataset  # noqa: E402
from tasks.storage import Store  # noqa: E402
from tasks.train import train  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--reps", type=int, default=2, help="runs per worker count")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="train_scaling.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    if args.quick:
        args.steps, args.log_every, args.reps = 60, 20, 1
    return args


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    load_before = os.getloadavg()[0]
    rates: dict[int, list[float]] = {1: [], 2: []}
    run = 0
    for rep in range(args.reps):
        for workers in (1, 2) if rep % 2 == 0 else (2, 1):
            run += 1
            cfg = resolve_config(
                PipelineConfig.model_validate(
                    {
                        "storage": {"root": str(root)},
                        "train": {
                            "run_id": f"scale-{run}",
                            "steps": args.steps,
                            "log_every": args.log_every,
                            "checkpoint_every": args.steps,
                            "num_workers": workers,
                            "cpus_per_worker": 1,
                        },
                        "ray": {"num_cpus": 2},
                    }
                )
            )
            store = Store(cfg.storage)
            train(cfg, store, shard_dataset(cfg.data, store).manifest)
            windows = TrainHistory.read(store, layout.train_history(cfg.train.run_id)).windows
            rates[workers].append(statistics.median(w.images_per_s for w in windows[1:]))
            print(f"{workers} worker(s): {rates[workers][-1]:.0f} img/s", flush=True)
    load_after = os.getloadavg()[0]
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"scaling: 1 worker {one:.0f} img/s, 2 workers {two:.0f} img/s, ratio {two / one:.2f}")
    body = "\n".join(
        [
            f"`digits`, default model, batch 64 per worker, {args.steps} steps per run, local Ray "
            f"with 2 CPUs, 1 CPU (1 torch thread) per worker; 1-minute load average "
            f"{load_before:.2f} before, {load_after:.2f} after.",
            "",
            "| workers | images/s, all ranks (median window, each run) |",
            "|---|---|",
            *(f"| {w} | {', '.join(f'{r:.0f}' for r in rates[w])} |" for w in (1, 2)),
            "",
            f"**Ratio 2 workers / 1 worker: {two / one:.2f}**",
        ]
    )
    path = write_results(args.out, "Data-parallel scaling (CPU)", "cpu", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
