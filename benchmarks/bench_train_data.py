"""Is the data off the critical path? Two measurements, each against what the trainer consumes.

1. Data wait: the fraction of step time a training run spends waiting for its next batch (the
   `data_wait` of its logging windows, `runs/<id>/logs/history.json`), for the Quickstart config
   (`digits`, the default model and batch, Ray Train with 2 workers of 1 CPU) and for the
   end-to-end benchmark's config (MNIST 28x28, `bench_train_e2e.py`, one worker in-process). The
   first window (it holds the data workers' start) is reported apart.
2. The loader alone: `RankBatches` through `load_batches` (the same background data worker a
   rank uses), reading the shards from the S3 test server (moto, on loopback), in images/s,
   against the images/s the trainer consumed in the same config (1.).

    uv run python -m benchmarks.bench_train_data           # ~5 min on 2 cores
    uv run python -m benchmarks.bench_train_data --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import mnist_settings, write_results
from tasks import layout
from tasks.config import PipelineConfig, resolve_config
from tasks.records import DatasetManifest, LogWindow, TrainHistory
from tasks.runtime import setup_process
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.data import RankBatches, load_batches
from tasks.train.loop import TrainJob, run_training
from tasks.train.stage import train
from tests.support.s3 import TEST_CREDENTIALS, MotoServer, create_bucket


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quickstart-steps", type=int, default=200)
    p.add_argument("--bench-steps", type=int, default=40)
    p.add_argument("--loader-batches", type=int, default=200)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="train_data.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    if args.quick:
        args.quickstart_steps, args.bench_steps, args.loader_batches = 40, 10, 40
    return args


def config(tree: dict[str, object]) -> PipelineConfig:
    return resolve_config(PipelineConfig.model_validate(tree))


def windows(store: Store, run_id: str) -> list[LogWindow]:
    return TrainHistory.read(store, layout.train_history(run_id)).windows


def loader_rate(
    store: Store, cfg: PipelineConfig, manifest: DatasetManifest, batches: int
) -> float:
    """Images/s one rank's background loader delivers, reading from `store`."""
    tc = cfg.train
    dataset = RankBatches(
        storage=store.config,
        shards=manifest.split("train").shards,
        rank=0,
        world_size=tc.workers,
        seed=tc.seed,
        shuffle_buffer=tc.shuffle_buffer,
        batch_size=tc.batch_size,
        channels=manifest.channels,
        hflip=cfg.data.hflip,
    )
    stream = load_batches(dataset, tc.loader_processes, torch.device("cpu"))
    next(stream)  # the worker's start is not the rate
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return batches * tc.batch_size / seconds


def row(name: str, ws: list[LogWindow]) -> tuple[str, float, float]:
    steady = ws[1:] or ws
    wait = statistics.mean(w.data_wait for w in steady)
    ips = statistics.median(w.images_per_s for w in steady)
    line = (
        f"| {name} | {100 * ws[0].data_wait:.1f}% | {100 * wait:.2f}% "
        f"({', '.join(f'{100 * w.data_wait:.1f}' for w in steady)}) | {ips:.0f} |"
    )
    return line, wait, ips


def main() -> None:
    args = parse_args()
    setup_process()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    # The test suite's S3 test server; Ray's workers inherit its credentials from this process.
    moto = MotoServer()
    os.environ.update(TEST_CREDENTIALS)
    endpoint = moto.endpoint
    root = f"s3://{create_bucket(endpoint, 'bench')}/pipeline"
    load_before = os.getloadavg()[0]
    try:
        # The Quickstart's config (defaults), its training on Ray with 2 workers, data on S3.
        quick_cfg = config(
            {
                "storage": {"root": root, "endpoint_url": endpoint},
                "train": {"steps": args.quickstart_steps, "run_id": "quickstart"},
                "ray": {"num_cpus": 2},
            }
        )
        store = Store(quick_cfg.storage)
        quick_manifest = shard_dataset(quick_cfg.data, store).manifest
        train(quick_cfg, store, quick_manifest)
        quick_line, quick_wait, quick_ips = row(
            "Quickstart (`digits` 8x8, batch 64 x 2 Ray workers)", windows(store, "quickstart")
        )
        quick_loader = loader_rate(store, quick_cfg, quick_manifest, args.loader_batches)

        # The end-to-end benchmark's config, one worker in-process (1 torch thread).
        bench_cfg = config(
            {
                "storage": {"root": str(work / "store")},
                **mnist_settings(4000),
                "train": {
                    "batch_size": 64,
                    "log_every": 10,
                    "checkpoint_every": 20,
                    "run_id": "bench",
                },
            }
        )
        bench_store = Store(bench_cfg.storage)
        bench_manifest = shard_dataset(bench_cfg.data, bench_store).manifest
        torch.set_num_threads(1)
        run_training(
            TrainJob(config=bench_cfg, target_step=args.bench_steps, manifest=bench_manifest)
        )
        bench_line, bench_wait, bench_ips = row(
            "benchmark config (MNIST 28x28, batch 64, 1 worker, 1 thread)",
            windows(bench_store, "bench"),
        )
        # Its loader reading the same shards from the S3 test server.
        s3_bench = bench_cfg.model_copy(update={"storage": store.config})
        s3_manifest = shard_dataset(bench_cfg.data, store).manifest
        bench_loader = loader_rate(
            Store(s3_bench.storage), s3_bench, s3_manifest, args.loader_batches
        )
    finally:
        moto.stop()
    load_after = os.getloadavg()[0]

    print(
        f"data wait: Quickstart {100 * quick_wait:.2f}%, benchmark config {100 * bench_wait:.2f}%; "
        f"loader from S3 / trainer: Quickstart {quick_loader:.0f}/{quick_ips / 2:.0f} img/s per rank = "
        f"{quick_loader / (quick_ips / 2):.1f}x, benchmark config {bench_loader:.0f}/{bench_ips:.0f} img/s = "
        f"{bench_loader / bench_ips:.1f}x"
    )
    body = "\n".join(
        [
            f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after.",
            "",
            "Data wait (fraction of step time a rank waits for its next batch, mean over ranks):",
            "",
            "| config | first window (data worker start) | later windows: mean (each, %) | trainer img/s (all ranks, median) |",
            "|---|---|---|---|",
            quick_line,
            bench_line,
            "",
            "The loader alone (one rank's `load_batches`, 1 background data worker, shards on the "
            "S3 test server) against what one rank of the trainer consumed:",
            "",
            "| config | loader img/s | trainer img/s per rank | ratio |",
            "|---|---|---|---|",
            f"| Quickstart | {quick_loader:.0f} | {quick_ips / 2:.0f} | **{quick_loader / (quick_ips / 2):.1f}x** |",
            f"| benchmark config | {bench_loader:.0f} | {bench_ips:.0f} | **{bench_loader / bench_ips:.1f}x** |",
        ]
    )
    path = write_results(args.out, "Training data path", "cpu", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
