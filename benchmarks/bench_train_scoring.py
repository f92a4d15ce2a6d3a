"""Training throughput with checkpoints scored while training runs, against training alone.

Both: the train stage (`tasks.train.stage.train`) on a local Ray cluster, one training worker of
`--train-cpus` CPUs, on the benchmark config (MNIST, 28x28, the 1.19 M-parameter UNet), from step
0 of a fresh run each time. "scored": `evaluate.score_every=1`, as the nightly's train stage runs
it (`flows.scoring.CheckpointScorer`): every checkpoint is sampled and scored (FID against the
held-out statistics) on one sampling and one feature worker of their own, holding the CPUs the
training worker does not. Runs alternate (ABBA). The ratio is of training images/s: the median of
the logging windows' rate after the first window (the user's `img/s` line), scored / alone. The
stage's wall time is printed too: it includes waiting for the last checkpoint's score.

    uv run python -m benchmarks.bench_train_scoring            # ~10 min on 2 cores
    uv run python -m benchmarks.bench_train_scoring --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import mnist_settings, write_results
from flows.scoring import CheckpointScorer
from tasks import layout
from tasks.config import PipelineConfig, resolve_config
from tasks.records import DatasetManifest, TrainHistory
from tasks.runtime import setup_process
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.stage import train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="MNIST test images to train on")
    p.add_argument("--steps", type=int, default=240, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--checkpoint-every", type=int, default=60)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--score-images", type=int, default=32, help="per seed range")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cpus", type=int, default=2, help="the local cluster's CPUs")
    p.add_argument("--train-cpus", type=int, default=1, help="the training worker's CPUs")
    p.add_argument("--reps", type=int, default=2, help="runs per variant (ABBA)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few images and steps")
    p.add_argument("--out", default="train_scoring.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    if args.quick:
        args.images, args.steps, args.checkpoint_every, args.log_every = 600, 24, 8, 4
        args.reps, args.score_images, args.sample_steps = 1, 8, 4
    return args


def pipeline_config(
    args: argparse.Namespace, root: Path, run_id: str, scored: bool
) -> PipelineConfig:
    settings = mnist_settings(args.images)
    spare = args.cpus - args.train_cpus
    return resolve_config(
        PipelineConfig.model_validate(
            {
                "storage": {"root": str(root / "store")},
                **settings,
                "train": {
                    "run_id": run_id,
                    "steps": args.steps,
                    "batch_size": args.batch,
                    "checkpoint_every": args.checkpoint_every,
                    "log_every": args.log_every,
                    "workers": 1,
                    "cpus_per_worker": args.train_cpus,
                    "loader_processes": 0,
                },
                "sample": {
                    "steps": args.sample_steps,
                    "num_images": args.score_images,
                    "images_per_task": args.score_images,
                    "batch_size": args.score_images,
                    "cpus_per_worker": spare,
                },
                "evaluate": {
                    "metrics": ["fid"],
                    "cpus_per_worker": spare,
                    "max_reference_images": 500,
                    "score_every": 1 if scored else 0,
                    "score_images": args.score_images,
                    "score_repeats": 2,
                },
                "ray": {"num_cpus": args.cpus},
            }
        )
    )


def run_once(cfg: PipelineConfig, store: Store, manifest: DatasetManifest) -> tuple[float, float]:
    """(median training images/s after the first window, the stage's wall seconds)."""
    start = time.perf_counter()
    if cfg.evaluate.score_every:
        with CheckpointScorer(cfg, manifest) as scorer:
            scorer.finish(train(cfg, store, manifest, on_checkpoint=scorer.submit))
    else:
        train(cfg, store, manifest)
    wall = time.perf_counter() - start
    history = TrainHistory.read(store, layout.train_history(cfg.train.run_id))
    rates = [w.images_per_s for w in history.windows[1:]] or [history.windows[0].images_per_s]
    return statistics.median(rates), wall


def main() -> None:
    setup_process()
    args = parse_args()
    if args.cpus - args.train_cpus < 1:
        raise SystemExit("--cpus must leave at least one CPU for scoring (--train-cpus)")
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        root = Path(tmp)
        base = pipeline_config(args, root, "warm", False)
        store = Store(base.storage)
        manifest = shard_dataset(base.data, store, base.ray).manifest
        results: dict[str, list[tuple[float, float]]] = {"alone": [], "scored": []}
        # A warm-up of each (Ray's workers, the reference statistics), then ABBA.
        order = ["alone", "scored"]
        for rep in range(args.reps + 1):
            for name in order if rep % 2 == 0 else order[::-1]:
                cfg = pipeline_config(args, root, f"{name}-{rep}", name == "scored")
                rate, wall = run_once(cfg, store, manifest)
                print(f"rep {rep} {name:6s}: {rate:7.1f} img/s training, stage {wall:6.1f} s")
                if rep:
                    results[name].append((rate, wall))
    alone = statistics.median(r for r, _ in results["alone"])
    scored = statistics.median(r for r, _ in results["scored"])
    ratio = scored / alone
    load = os.getloadavg()
    body = (
        f"- Load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
        f"- {args.steps} steps of batch {args.batch}, a checkpoint every "
        f"{args.checkpoint_every} ({args.steps // args.checkpoint_every} scored), training on "
        f"{args.train_cpus} CPU(s), scoring on {args.cpus - args.train_cpus}; scoring: 2 ranges "
        f"of {args.score_images} images, DDIM {args.sample_steps} steps, FID\n\n"
        "| variant | training img/s (median of runs) | stage wall s (runs) |\n"
        "|---|---|---|\n"
        + "".join(
            f"| {name} | {statistics.median(r for r, _ in runs):.1f} | "
            f"{', '.join(f'{w:.1f}' for _, w in runs)} |\n"
            for name, runs in results.items()
        )
        + f"\n**ratio (scored / alone, training img/s): {ratio:.3f}** (goal >= 0.95)\n"
    )
    print(body)
    print(write_results(args.out, "Training throughput with scoring while training", "cpu", body))


if __name__ == "__main__":
    main()
