"""Inception feature extraction: our Ray feature workers vs torch-fidelity's own CLI, and scaling.

The same N MNIST test digits (28x28, as PNG files for the CLI and as WebDataset sample shards for
us) and the same weights file (the seeded stand-in InceptionV3; torch-fidelity reads it with
`--feature-extractor-weights-path`). Contenders, interleaved (ABBA), wall time of the whole job:
- `fidelity --isc --cpu --no-cache` (one pass over input1: start, load, extract, IS), all threads;
- ours, 1 worker x 2 CPUs: `RayPool` + `map_shards` (start, load, stream shards, extract, keep the
  features in the store, moments) -- target >= 1.0x the CLI;
- ours, 1 worker x 1 CPU and 2 workers x 1 CPU each -- target 2 workers >= 1.8x 1 worker.

    uv run python -m benchmarks.bench_extraction [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks._common import write_results
from tasks import layout
from tasks.config import EvalConfig, RayConfig, StorageConfig
from tasks.evaluate.features import ShardJob
from tasks.evaluate.inception import resolve_extractor
from tasks.evaluate.stage import RayPool
from tasks.ray_runtime import ensure_ray
from tasks.runtime import setup_process
from tasks.storage import Store
from tasks.webdata import encode_png, write_shard
from tests.support.paths import MNIST, read_idx


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, help="images per run")
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, help="timed runs per contender")
    p.add_argument("--out", default="extraction.md", help="file name under benchmarks/results/")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    setup_process()
    args.images = args.images or (64 if args.quick else 192)
    args.reps = args.reps or (1 if args.quick else 2)
    logging.basicConfig(level=logging.WARNING)
    gpu = args.device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        store = Store(StorageConfig(root=str(work / "store")))
        images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[: args.images]
        png_dir = work / "png"
        png_dir.mkdir()
        for i, img in enumerate(images):
            (png_dir / f"{i:06d}.png").write_bytes(encode_png(img))
        prefix = layout.sample_set_prefix("bench", "extraction")
        jobs = []
        for n, lo in enumerate(range(0, args.images, args.per_shard)):
            part = images[lo : lo + args.per_shard]
            samples = (
                {"__key__": f"{lo + j:010d}", "png": encode_png(im)} for j, im in enumerate(part)
            )
            info = write_shard(store, layout.sample_shard(prefix, n), samples)
            jobs.append((n, info))
        extractor = resolve_extractor(
            EvalConfig(), store, cache_dir=work / "cache", standard_url="http://127.0.0.1:9/none"
        )
        ensure_ray(RayConfig(num_cpus=os.cpu_count() or 2))
        runs_done = {"n": 0}

        def ours(workers: int, cpus: float) -> Callable[[], None]:
            def run() -> None:
                runs_done["n"] += 1
                # fresh feature keys every run: nothing is read back from an earlier one
                sha = f"{runs_done['n']:04d}" + extractor.sha256[4:]
                cfg = EvalConfig(
                    batch_size=args.batch, workers=workers, cpus_per_worker=cpus, use_gpu=gpu
                )
                pool = RayPool(store, cfg, RayConfig(), extractor, 1, units=len(jobs))
                try:
                    shard_jobs = [
                        ShardJob(
                            n, i.key, i.count, i.sha256, layout.sample_features(prefix, sha, n)
                        )
                        for n, i in jobs
                    ]
                    for _ in pool.map_shards(shard_jobs):
                        pass
                finally:
                    pool.close()

            return run

        def cli() -> None:
            cmd = [
                str(Path(sys.executable).parent / "fidelity"),
                "--input1", str(png_dir),
                "--isc", "--no-cache", "--silent", "--json",
                "--batch-size", str(args.batch),
                "--feature-extractor", "inception-v3-compat",
                "--feature-extractor-weights-path", str(extractor.path),
            ] + (["--gpu", "0"] if gpu else ["--cpu"])  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)

        runs: dict[str, Callable[[], None]] = {
            "torch-fidelity CLI (fidelity --isc)": cli,
            "ours, 1 worker x 2 CPUs": ours(1, 2.0),
            "ours, 1 worker x 1 CPU": ours(1, 1.0),
            "ours, 2 workers x 1 CPU": ours(2, 1.0),
        }
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        for rep in range(args.reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
                print(f"  {name}: {args.images / times[name][-1]:.2f} img/s", flush=True)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ips = {name: args.images / statistics.median(ts) for name, ts in times.items()}
    names = list(runs)
    vs_cli = ips[names[1]] / ips[names[0]]
    scale = ips[names[3]] / ips[names[2]]
    summary = (
        f"extraction: ours {ips[names[1]]:.2f} img/s vs fidelity CLI {ips[names[0]]:.2f} img/s "
        f"(ratio {vs_cli:.2f}, target >= 1.0); 2 workers / 1 worker = {scale:.2f} (target >= 1.8)"
    )
    print(summary)
    body = "\n".join(
        [
            f"{args.images} MNIST test digits (28x28, resized to 299x299 by the extractor), "
            f"{args.per_shard} per shard, batch {args.batch}, device {args.device}; weights: "
            f"{extractor.label} (sha256 `{extractor.sha256[:16]}`), the same file for all. Wall time "
            f"of the whole job (process/actor start and weights load included), {args.reps} run(s) "
            "each, interleaved; median.",
            "",
            "| contender | images/s | run s (median) |",
            "|---|---|---|",
            *(f"| {n} | {ips[n]:.2f} | {statistics.median(times[n]):.1f} |" for n in names),
            "",
            f"**Ours (1 worker x 2 CPUs) / torch-fidelity CLI: {vs_cli:.2f}** (target >= 1.0)",
            "",
            f"**2 workers / 1 worker (1 CPU each): {scale:.2f}** (target >= 1.8)",
            "",
            f"Load average (1 min): {load_before:.1f} before, {load_after:.1f} after (2 cores).",
        ]
    )
    path = write_results(
        args.out, "Feature extraction: Ray workers vs torch-fidelity CLI", args.device, body
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
