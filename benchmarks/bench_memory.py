"""Memory of the sampling + evaluation jobs: the driver's peak RSS must not grow with the images.

For each N, a fresh driver process (so its peak RSS is its own) shards `digits`, trains a tiny UNet
a few steps, samples N images on the Ray actor pool (DDIM, few steps) and evaluates them on the Ray
feature pool (stand-in extractor, FID + KID). Peak RSS: the driver's `ru_maxrss`; each Ray actor's
VmHWM (/proc), polled while it lives. Reference: the same driver at the smallest N.

    uv run python -m benchmarks.bench_memory                  # N = 500 and 2000 (CPU, ~15 min)
    uv run python -m benchmarks.bench_memory --quick          # N = 100 and 400
    # GPU cluster, 50k images (the published-FID size), 3 repeats:
    RAY_ADDRESS=<head>:6379 uv run python -m benchmarks.bench_memory --images 50000 \\
        --gpu --storage s3://bucket/bench-memory --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import write_results
from tasks.runtime import setup_process
from tests.support import procs
from tests.support.config import TINY
from tests.support.paths import REPO

ACTORS = ("ray::SeedRangeSampler", "ray::FeatureWorker")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--images", type=int, nargs="+", help="N values (images per repeat)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="sample.use_gpu and evaluate.use_gpu")
    p.add_argument("--storage", help="storage root (default: a temporary folder)")
    p.add_argument("--driver", type=int, help=argparse.SUPPRESS)  # internal: one driver run
    p.add_argument("--out", default="memory.md", help="file name under benchmarks/results/")
    return p.parse_args()


class ActorWatch(threading.Thread):
    """Polls the peak RSS (VmHWM) of our sampling and feature actors while they live."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[str, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, cmd in procs.below().items():
                title = cmd.split(b"\0")[0].decode(errors="replace")
                if not title.startswith(ACTORS):
                    continue
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                kb = int(
                    next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[
                        1
                    ]
                )
                kind = title.split(".")[0].removeprefix("ray::")
                self.peaks[pid] = (kind, max(kb, self.peaks.get(pid, (kind, 0))[1]))
            time.sleep(0.2)


def driver(n: int, args: argparse.Namespace) -> None:
    """One driver: shard, train, sample N, evaluate; prints its and its actors' peak RSS (JSON)."""
    from tasks.config import PipelineConfig
    from tasks.evaluate.stage import evaluate
    from tasks.ray_runtime import ensure_ray
    from tasks.sample.stage import sample_images
    from tasks.shard.stage import shard_dataset
    from tasks.storage import open_store
    from tasks.train.loop import TrainJob, run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    try:
        cfg = PipelineConfig.model_validate(
            {
                "storage": {"root": args.storage or str(work / "store")},
                "model": TINY["model"],  # the tests' tiny network
                "train": {"run_id": f"mem-{n}", "batch_size": 16, "steps": 20, "log_every": 10},
                "sample": {
                    "num_images": n,
                    "steps": 4,
                    "images_per_task": 250,
                    "batch_size": 250,
                    "use_gpu": args.gpu,
                },
                "evaluate": {
                    "metrics": ["fid", "kid"],
                    "repeats": args.repeats,
                    "batch_size": 50,
                    "use_gpu": args.gpu,
                },
            }
        )
        store = open_store(cfg.storage)
        manifest = shard_dataset(cfg.data, store).manifest
        ckpt = run_training(TrainJob(config=cfg, target_step=20, manifest=manifest)).checkpoint
        ensure_ray(cfg.ray)
        watch = ActorWatch()
        watch.start()
        t0 = time.monotonic()
        samples = sample_images(store, cfg.sample, cfg.ray, ckpt, repeats=args.repeats)
        t1 = time.monotonic()
        metrics = evaluate(store, cfg.evaluate, cfg.ray, manifest, samples)
        t2 = time.monotonic()
        watch.stop.set()
        watch.join()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = {
            "n": n,
            "driver_mb": peak_mb,
            "actors": sorted((kind, kb / 1024) for kind, kb in watch.peaks.values()),
            "sample_s": t1 - t0,
            "evaluate_s": t2 - t1,
            "fid": metrics.fid,
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        if not args.storage:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args = parse_args()
    setup_process()
    if args.driver is not None:
        driver(args.driver, args)
        return
    sizes = args.images or ([100, 400] if args.quick else [500, 2000])
    load_before = os.getloadavg()[0]
    results = []
    for n in sizes:
        cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--driver", str(n)]
        cmd += ["--repeats", str(args.repeats)]
        cmd += (["--gpu"] if args.gpu else []) + (
            ["--storage", args.storage] if args.storage else []
        )
        out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
        print(line, flush=True)
    load_after = os.getloadavg()[0]
    base = results[0]["driver_mb"]
    rows = []
    for r in results:
        kinds: dict[str, list[float]] = {}
        for kind, mb in r["actors"]:
            kinds.setdefault(kind, []).append(mb)
        actors = "; ".join(
            f"{kind}: " + ", ".join(f"{mb:.0f}" for mb in mbs)
            for kind, mbs in sorted(kinds.items())
        )
        rows.append(
            f"| {r['n']} | {r['driver_mb']:.0f} | {r['driver_mb'] / base:.3f} | {actors} | "
            f"{r['sample_s']:.0f} | {r['evaluate_s']:.0f} | {r['fid']:.4f} |"
        )
    growth = results[-1]["driver_mb"] / base
    print(f"driver peak RSS at N={sizes[-1]} / N={sizes[0]}: {growth:.3f}")
    body = "\n".join(
        [
            "Each N in a fresh driver process: shard `digits`, train a UNet (base 8, mult 1-2) 20 "
            f"steps, sample N x {args.repeats} images (DDIM 4 steps, 250 per seed range) on the "
            "sampling actor pool, evaluate them (stand-in InceptionV3, FID + KID) on the feature "
            f"pool; {'GPU' if args.gpu else 'CPU'}. Peak RSS in MB: the driver's `ru_maxrss` "
            "(the whole process: shard + train + sample + evaluate), each actor's VmHWM.",
            "",
            "| N | driver peak MB | vs smallest N | actors' peak MB | sample s | evaluate s | FID (stand-in) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"**Driver peak RSS at N={sizes[-1]} / N={sizes[0]}: {growth:.3f}** (flat = 1.0)",
            "",
            f"Load average (1 min): {load_before:.1f} before, {load_after:.1f} after (2 cores).",
        ]
    )
    path = write_results(
        args.out, "Memory of sample + evaluate vs the number of images", "cpu", body
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
