"""Quality proxy on real data: train on the MNIST test set (28x28) and score FID at several steps.

The pipeline as it runs at night, on one machine: shard (MNIST test set, `data.source_split=test`),
train (resuming run to each step), sample (the Ray actor pool) and evaluate (the Ray feature pool)
against the held-out split. The FID uses the seeded STAND-IN InceptionV3 (the standard weights
cannot be had here): its numbers are NOT comparable with published FIDs, only with each other.
It must fall as training proceeds; the sample grid of the last step must show digits.

    uv run python -m benchmarks.bench_quality_mnist            # ~20 min on 2 CPU cores
    uv run python -m benchmarks.bench_quality_mnist --quick    # ~4 min
    DIFFPIPE_TEST_DATA=/path/to/shared/data uv run python -m benchmarks.bench_quality_mnist
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import RESULTS_DIR, write_results
from tasks.config import PipelineConfig
from tasks.evaluate.stage import evaluate
from tasks.ray_runtime import ensure_ray
from tasks.records import DatasetManifest, Metrics
from tasks.runtime import setup_process
from tasks.sample.stage import sample_images
from tasks.shard.stage import shard_dataset
from tasks.storage import open_store
from tasks.train.loop import TrainJob, run_training
from tests.support.paths import MNIST


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps, samples and references")
    p.add_argument("--steps", type=int, nargs="+", help="training steps to evaluate at")
    p.add_argument("--samples", type=int, help="sampled images per evaluation")
    p.add_argument("--reference", type=int, help="held-out images for the reference statistics")
    p.add_argument("--out", default="quality_mnist.md", help="file name under benchmarks/results/")
    return p.parse_args()


def mnist_root(work: Path) -> Path:
    """torchvision's layout (<root>/MNIST/raw/) over the shared IDX files."""
    src = MNIST
    raw = work / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        if not (src / name).is_file():
            raise SystemExit(
                f"{src / name} not found: set DIFFPIPE_TEST_DATA to the shared data folder"
            )
        if not (raw / name).exists():
            (raw / name).symlink_to(src / name)
    return work / "mnist"


def report(
    args: argparse.Namespace,
    rows: list[tuple[int, float, float, float, float]],
    label: str,
    sha: str,
    manifest: DatasetManifest,
    m: Metrics,
    t_start: float,
) -> None:
    fids = [r[1] for r in rows]
    falls = all(b < a for a, b in zip(fids, fids[1:], strict=False))
    last = rows[-1][0]
    body = "\n".join(
        [
            f"**Stand-in extractor:** a seeded, He-initialised torch-fidelity InceptionV3 ({label}, "
            f"sha256 `{sha[:16]}`): these FIDs are NOT comparable with published FIDs, only with "
            "each other.",
            "",
            "Data: the MNIST test set (10,000 digits, 28x28), sharded with "
            f"`data.source_split=test`: {manifest.split('train').count} training and "
            f"{manifest.split('holdout').count} held-out images. Model: UNet base 16, mult "
            "(1, 2, 2), attention at 7x7, batch 32, lr 2e-3, EMA 0.995. Samples: "
            f"{m.num_images} per step, DPM-Solver++ 2M, 20 steps, logsnr spacing, {m.weights} "
            f"weights. Reference: {m.num_reference_images} held-out images.",
            "",
            "| training step | FID (stand-in) | KID (stand-in) | evaluate s | train s (to this step) |",
            "|---|---|---|---|---|",
            *(
                f"| {s} | {fid:.4f} | {kid:.5f} | {te:.0f} | {tt:.0f} |"
                for s, fid, kid, te, tt in rows
            ),
            "",
            f"**FID falls at every step: {'yes' if falls else 'NO'}**; last / first = "
            f"{fids[-1] / fids[0]:.3f}. {time.monotonic() - t_start:.0f} s so far. Sample grid "
            f"at step {last}: `quality_mnist_grid.png`.",
            "",
            f"![samples at step {last}](quality_mnist_grid.png)",
            "",
            f"Load average (1 min): {os.getloadavg()[0]:.1f} (2 cores).",
        ]
    )
    path = write_results(args.out, "Quality proxy: MNIST FID over training", "cpu", body)
    print(f"FID falls: {falls}; last/first = {fids[-1] / fids[0]:.3f}; wrote {path}", flush=True)


def quality_config(work: Path, steps: int, n_samples: int, n_reference: int) -> PipelineConfig:
    """The quality proxy's pipeline: the MNIST test set, the model and training every step of this
    benchmark uses (`benchmarks.sampler_sweep` trains the same checkpoint), `steps` at most."""
    return PipelineConfig.model_validate(
        {
            "storage": {"root": str(work / "store")},
            "data": {
                "dataset": "mnist",
                "root": str(mnist_root(work)),
                "source_split": "test",
                "samples_per_shard": 1000,
            },
            "model": {
                "base_channels": 16,
                "channel_mult": [1, 2, 2],
                "attention_resolutions": [7],
            },
            "train": {
                "run_id": "mnist-quality",
                "batch_size": 32,
                "lr": 2e-3,
                "warmup_steps": 20,
                "ema_decay": 0.995,  # the project's default
                "ema_warmup_steps": 100,
                "checkpoint_every": 10_000,
                "log_every": 50,
                "steps": steps,
            },
            "sample": {
                "num_images": n_samples,
                "sampler": "dpmpp_2m",
                "steps": 20,
                "spacing": "logsnr",
                "images_per_task": max(16, n_samples // 4),
                "batch_size": 64,
            },
            "evaluate": {
                "repeats": 1,  # one sample set per step: the table follows FID over training
                "metrics": ["fid", "kid"],
                "max_reference_images": n_reference,
                "batch_size": 32,
                "kid_subset_size": min(100, n_samples),
                "grid_images": 64,
            },
            "ray": {"num_cpus": os.cpu_count() or 2},
        }
    )


def main() -> None:
    args = parse_args()
    setup_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = args.steps or ([30, 150, 400] if args.quick else [50, 500, 2000, 4000])
    n_samples = args.samples or (96 if args.quick else 256)
    n_reference = args.reference or (128 if args.quick else 500)
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        cfg = quality_config(work, max(steps), n_samples, n_reference)
        store = open_store(cfg.storage)
        manifest = shard_dataset(cfg.data, store).manifest
        ensure_ray(cfg.ray)
        rows: list[tuple[int, float, float, float, float]] = []
        t_start = time.monotonic()
        for step in steps:
            t0 = time.monotonic()
            ckpt = run_training(
                TrainJob(config=cfg, target_step=step, manifest=manifest)
            ).checkpoint
            t_train = time.monotonic() - t0
            samples = sample_images(store, cfg.sample, cfg.ray, ckpt)
            t1 = time.monotonic()
            m = evaluate(store, cfg.evaluate, cfg.ray, manifest, samples)
            assert m.fid is not None and m.kid_mean is not None
            rows.append((step, m.fid, m.kid_mean, time.monotonic() - t1, t_train))
            print(f"step {step}: FID {m.fid:.4f}  KID {m.kid_mean:.5f}", flush=True)
            # the table and grid so far: a long run that is cut short keeps its results
            (RESULTS_DIR / "quality_mnist_grid.png").write_bytes(store.read_bytes(m.grid_key))
            report(args, rows, m.extractor.label, m.extractor.weights_sha256, manifest, m, t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
