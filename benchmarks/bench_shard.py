"""Sharding an image folder: our shard stage vs the loop a webdataset user writes.

Data: the MNIST test set ($DIFFPIPE_TEST_DATA/mnist, or ../shared/data/mnist) exported as PNG
files, once as is and once mirrored: 20,000 files of 28x28 in ten class folders.

- reference: `webdataset.ShardWriter` over the same sorted files in one process (read the bytes,
  write {"__key__", "png", "cls"}; no decoding);
- ours: `shard_dataset` on a local Ray cluster of 2 CPUs with `data.workers` = 1 and 2 (one
  1-CPU task per shard; each image decoded, checked and written, PNGs kept as they are);
- driver peak RSS (a fresh driver process, `ru_maxrss`) for 5,000 vs 20,000 files;
- the same with the S3 test server (moto_server) as source and destination (the reference reads
  each object through s3fs and uploads each finished shard).
Runs alternate (ABBA) so machine noise hits every contender alike; each run writes a fresh store.

    uv run python -m benchmarks.bench_shard            # 20,000 files, 3 reps, S3 on 20,000
    uv run python -m benchmarks.bench_shard --quick    # 2,000 files, 1 rep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks._common import write_results
from tasks.runtime import setup_process
from tests.support.paths import MNIST, REPO, read_idx
from tests.support.s3 import TEST_CREDENTIALS, MotoServer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 files, 1 rep (a smoke run)")
    p.add_argument("--files", type=int, default=20_000, help="files in the folder (max 20,000)")
    p.add_argument("--small", type=int, default=5_000, help="the smaller count for driver RSS")
    p.add_argument("--reps", type=int, default=3, help="timed runs per contender")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 test server part")
    p.add_argument(
        "--s3-files", type=int, default=None, help="files in the bucket (default: --files)"
    )
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="shard.md", help="file name under benchmarks/results/")
    # internal: one driver run in a fresh process, for its peak RSS
    p.add_argument("--driver", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def export_mnist(folder: Path, n: int) -> list[Path]:
    """The MNIST test set as `n` PNG files `folder/<label>/<index>.png` (mirrored copies past
    10,000), written once and reused."""
    from PIL import Image

    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    paths = []
    for i in range(n):
        path = folder / str(labels[i % 10_000]) / f"{i:05d}.png"
        paths.append(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            image = images[i % 10_000] if i < 10_000 else images[i % 10_000][:, ::-1]
            Image.fromarray(np.ascontiguousarray(image)).save(path)
    return sorted(paths)


def reference_local(files: list[Path], root: Path, out: Path) -> None:
    """What a webdataset user writes: one process, ShardWriter, the files' bytes as they are."""
    import webdataset as wds

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=512, verbose=0) as sink:
        for path in files:
            with open(path, "rb") as f:
                data = f.read()
            key = str(path.relative_to(root).with_suffix(""))
            sink.write({"__key__": key, "png": data, "cls": int(path.parent.name)})


def reference_s3(fs: object, keys: list[str], source: str, bucket: str, out: Path) -> None:
    """The same loop reading objects through s3fs and uploading each finished shard."""
    import webdataset as wds

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def upload(fname: str) -> None:
        fs.put(fname, f"{bucket}/ref/{out.name}/{Path(fname).name}")  # type: ignore[attr-defined]
        os.remove(fname)

    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=512, verbose=0, post=upload) as sink:
        for key in keys:
            data = fs.cat_file(f"{source}/{key}")  # type: ignore[attr-defined]
            label = key.split("/")[-2]
            sink.write({"__key__": key.rsplit(".", 1)[0], "png": data, "cls": int(label)})


def ours(dataset: str, storage: dict[str, object], workers: int, max_images: int | None) -> int:
    from tasks.config import DataConfig, RayConfig, StorageConfig
    from tasks.shard.stage import shard_dataset
    from tasks.storage import Store

    cfg = DataConfig(dataset=dataset, channels=1, workers=workers, max_images=max_images)
    result = shard_dataset(cfg, Store(StorageConfig(**storage)), RayConfig())  # type: ignore[arg-type]
    assert not result.reused
    return result.manifest.split("train").count + result.manifest.split("holdout").count


def driver_rss(dataset: str, storage: dict[str, object], n: int, gcs: str) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of a fresh driver process sharding the first `n` files on
    the benchmark's Ray cluster with 2 workers."""
    job = json.dumps({"dataset": dataset, "storage": storage, "n": n})
    env = {**os.environ, "RAY_ADDRESS": gcs}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_shard", "--driver", job],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    rss, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return int(rss), float(seconds)


def run_driver(job_json: str) -> None:
    import resource

    job = json.loads(job_json)
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    start = time.perf_counter()
    count = ours(job["dataset"], job["storage"], 2, job["n"])
    assert count == job["n"], count
    seconds = time.perf_counter() - start
    print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds]))


def interleave(runs: dict[str, Callable[[int], object]], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runs[name](rep)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    setup_process()
    if args.driver:
        return run_driver(args.driver)
    if args.quick:
        args.files, args.small, args.reps = 2_000, 500, 1
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-shard-"))
    folder = work / f"mnist-png-{args.files}"
    files = export_mnist(folder, args.files)
    n = len(files)
    load = os.getloadavg()[0]

    import ray

    # Moto first: Ray's workers inherit the S3 test credentials from this process.
    moto = None
    if not args.no_s3:
        moto = MotoServer()
        os.environ.update(TEST_CREDENTIALS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    gcs = ray.get_runtime_context().gcs_address
    rows: list[str] = []
    print(f"{n} files in {folder}; Ray up", flush=True)

    def scratch(name: str, rep: int) -> Path:
        path = work / "out" / f"{name}-{rep}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    local = f"imagefolder:{folder}"
    runs: dict[str, Callable[[int], object]] = {
        "reference": lambda r: reference_local(files, folder, scratch("ref", r)),
        "ours, 1 worker": lambda r: ours(local, {"root": str(scratch("w1", r))}, 1, None),
        "ours, 2 workers": lambda r: ours(local, {"root": str(scratch("w2", r))}, 2, None),
    }
    ours(local, {"root": str(scratch("warmup", 0))}, 2, min(n, 2_000))  # start Ray's workers
    times = interleave(runs, args.reps)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    rows += table("local folder", n, rate, times)
    print("\n".join(rows), flush=True)
    small, big = (
        driver_rss(local, {"root": str(scratch(f"rss{c}", 0))}, c, gcs) for c in (args.small, n)
    )
    rows.append(rss_row("local folder", args.small, n, small, big))

    if moto is not None:
        try:
            rows += s3_part(args, files, folder, moto.endpoint, gcs, work / "out", moto.proc.pid)
        finally:
            moto.stop()
    ray.shutdown()
    shutil.rmtree(work / "out", ignore_errors=True)
    body = (
        f"{n} MNIST PNG files (28x28, grayscale, ten class folders); local Ray cluster of 2 CPUs, "
        f"one 1-CPU task per shard; median of {args.reps} run(s), interleaved (ABBA). 1-minute "
        f"load average at the start: {load:.2f}.\n\n"
        "| source -> store | contender | images/s | ratio |\n|---|---|---|---|\n" + "\n".join(rows)
    )
    path = write_results(args.out, "Sharding an image folder", "cpu", body)
    print(body)
    print(f"\nwrote {path}")


def table(where: str, n: int, rate: dict[str, float], times: dict[str, list[float]]) -> list[str]:
    ref, one, two = rate["reference"], rate["ours, 1 worker"], rate["ours, 2 workers"]
    return [
        f"| {where} | webdataset.ShardWriter loop, 1 process (reference) | {ref:.0f} | 1.00 |",
        f"| {where} | ours, 1 worker | {one:.0f} | **{one / ref:.2f}** x reference |",
        f"| {where} | ours, 2 workers | {two:.0f} | **{two / one:.2f}** x 1 worker |",
    ]


def rss_row(where: str, small: int, big: int, a: tuple[int, float], b: tuple[int, float]) -> str:
    return (
        f"| {where} | driver peak RSS, {small} vs {big} files (2 workers) | "
        f"{a[0] / 2**20:.0f} MiB vs {b[0] / 2**20:.0f} MiB | **{b[0] / a[0]:.2f}** |"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3_part(
    args: argparse.Namespace,
    files: list[Path],
    folder: Path,
    endpoint: str,
    gcs: str,
    out: Path,
    server_pid: int,
) -> list[str]:
    import boto3
    import s3fs

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for bucket in ("source", "store"):
        s3.create_bucket(Bucket=bucket)
    files = files[: args.s3_files or len(files)]
    keys = [f"mnist/{p.relative_to(folder)}" for p in files]
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda kp: s3.upload_file(str(kp[1]), "source", kp[0]),
                zip(keys, files, strict=True),
            )
        )
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False)
    source = "imagefolder:s3://source/mnist/"

    def store(name: str) -> dict[str, object]:
        return {"root": f"s3://store/{name}", "endpoint_url": endpoint}

    runs: dict[str, Callable[[int], object]] = {
        "reference": lambda r: reference_s3(fs, keys, "source", "store", out / f"s3ref-{r}"),
        "ours, 1 worker": lambda r: ours(source, store(f"w1-{r}"), 1, None),
        "ours, 2 workers": lambda r: ours(source, store(f"w2-{r}"), 2, None),
    }
    # How busy the one moto_server process is during each run, in cores: near 1.0, it (not the
    # shard tasks) sets the pace, and a second worker cannot go faster.
    busy: dict[str, list[float]] = {name: [] for name in runs}

    def watched(name: str, run: Callable[[int], object]) -> Callable[[int], object]:
        def go(rep: int) -> None:
            cpu, start = cpu_seconds(server_pid), time.perf_counter()
            run(rep)
            busy[name].append((cpu_seconds(server_pid) - cpu) / (time.perf_counter() - start))

        return go

    reps = max(1, args.reps // 2)
    times = interleave({name: watched(name, run) for name, run in runs.items()}, reps)
    rate = {k: len(keys) / statistics.median(v) for k, v in times.items()}
    rows = table("S3 (moto_server) -> S3", len(keys), rate, times)
    rows.append(
        "| S3 (moto_server) -> S3 | moto_server's CPU use during the runs (cores): "
        + ", ".join(f"{name} {statistics.median(b):.2f}" for name, b in busy.items())
        + " | | |"
    )
    sizes = (min(args.small, len(keys) // 4), len(keys))
    small, big = (driver_rss(source, store(f"rss{c}"), c, gcs) for c in sizes)
    rows.append(rss_row("S3 (moto_server) -> S3", sizes[0], sizes[1], small, big))
    return rows


if __name__ == "__main__":
    main()
