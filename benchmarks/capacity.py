"""A capacity model of the nightly: measured work per unit here, projected onto N GPUs.

1. Measure. The whole nightly (`diffpipe nightly`, the Quickstart's `digits`, a local store) runs
   twice in a fresh driver process, with every stage's workers at 1 and then at 2. Each night's
   summary records, per stage, its wall time and its usage counted where the work happened
   (`tasks.usage`: CPU and GPU seconds, bytes, object-store requests by kind); the driver reports
   its own peak RSS. Work per unit = usage / units (images sharded, trained, sampled, scored).
   Checkpoint size and write time are measured on the cluster config's own network (model + EMA
   + AdamW state, `diffusion_core.checkpoint`).
2. Check. From the 1-worker night, predict the 2-worker night: a stage's wall time is a fixed part
   (wall minus its workers' device seconds per worker) plus its work divided among the workers;
   requests and bytes scale with the units. The error against the measured 2-worker night is
   printed.
3. Project `configs/nightly-cluster.yaml` on N = 1, 8, 64, 1,000 GPUs with the per-GPU rates below
   (each cited; the GPU check, `bash benchmarks/gpu.sh`, replaces them with measured ones):
   stage times, store request rate and bandwidth, checkpoint stall, driver memory, shards and
   feature files per night, and the first bottleneck.

    uv run python -m benchmarks.capacity            # a few minutes, on a quiet machine
    uv run python -m benchmarks.capacity --quick    # check that it works (numbers not for use)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks._common import write_results
from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.ema import EMA
from diffusion_core.objectives import training_loss
from diffusion_core.schedules import alpha_bar_from_betas, linear_betas
from diffusion_core.unet import UNet, UNetConfig
from tasks.runtime import setup_process
from tests.support.paths import REPO

CLUSTER = REPO / "configs" / "nightly-cluster.yaml"
SCALES = (1, 8, 64, 1000)
STAGES = ("shard", "train", "sample", "evaluate")

# Per-GPU rates for the projection, with their sources. Replace them with `gpu.sh`'s numbers.
RATES = {
    # EDM (Karras et al. 2022, github.com/NVlabs/edm README: "CIFAR-10 ... ~2 days on 8 V100",
    # 200 Mimg) ~ 145 img/s per V100 for a 56M-parameter CIFAR-10 network; the issue quotes it.
    "train_ips": (145.0, "EDM: ~145 img/s per V100, CIFAR-10 32x32 (Karras et al. 2022)"),
    # A sampled image costs NFE forward passes; a trained one ~3 (forward + backward ~ 2 forwards,
    # Kaplan et al. 2020's 6N vs 2N FLOPs per token), so sampling img/s ~ train img/s x 3 / NFE.
    "forwards_per_train_image": (3.0, "forward + backward = 3 forwards (6N vs 2N FLOPs)"),
    # InceptionV3 at 299x299: 5.7 GFLOPs per image (Szegedy et al. 2016); at ~8 TFLOP/s achieved
    # on a V100 in fp32 (half its 15.7 peak) ~ 1,400 img/s.
    "score_ips": (1400.0, "InceptionV3 5.7 GFLOP/img at ~8 TFLOP/s achieved (V100 fp32)"),
    # One node's upload bandwidth to the object store (a 10-25 Gbit/s cloud NIC, one stream of
    # multipart parts): 1 GB/s for rank 0's checkpoint write.
    "node_upload_Bps": (1e9, "1 GB/s per node to the store (10-25 Gbit/s NIC)"),
    # AWS S3: 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests/s per partitioned prefix
    # (docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html).
    "prefix_get_rps": (5500.0, "S3: 5,500 GET/HEAD per second per prefix"),
    "prefix_put_rps": (3500.0, "S3: 3,500 PUT/DELETE per second per prefix"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller night: checks the script only")
    p.add_argument("--train-ips", type=float, default=None, help="per-GPU training img/s")
    p.add_argument("--score-ips", type=float, default=None, help="per-GPU Inception img/s")
    p.add_argument("--out", default="capacity.md", help="file name under benchmarks/results/")
    return p.parse_args()


# -- 1. measure ----------------------------------------------------------------------------------
# The driver: runs the CLI's nightly and prints its own peak RSS (ru_maxrss, KiB on Linux).
DRIVER = """
import resource, sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print("DRIVER_MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


@dataclass
class Night:
    workers: int
    wall_s: float
    driver_mb: float
    units: dict[str, int]  # per stage: images sharded, trained, sampled, scored
    stages: dict[str, dict[str, Any]]  # per stage: seconds and usage (StageTiming as JSON)
    checkpoint_bytes: int


def night_settings(workers: int, quick: bool) -> list[str]:
    steps, images = (40 if quick else 300), night_images(quick)
    return [
        f"data.workers={workers}",
        f"train.workers={workers}",
        f"train.steps={steps}",
        f"train.steps_per_night={steps}",
        f"train.checkpoint_every={steps // 2}",
        f"sample.workers={workers}",
        f"sample.num_images={images}",
        "sample.steps=10",
        f"sample.images_per_task={images // TASKS_HERE}",
        f"evaluate.workers={workers}",
        "evaluate.repeats=1",
    ]


def run_night(workers: int, quick: bool) -> Night:
    with tempfile.TemporaryDirectory(prefix="capacity-") as root:
        cmd = [sys.executable, "-c", DRIVER, "nightly", f"storage.root={root}"]
        cmd += night_settings(workers, quick)
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the {workers}-worker night failed:\n{done.stdout}\n{done.stderr}")
        rss = next(
            line.split()[1] for line in done.stdout.splitlines() if line.startswith("DRIVER_MAXRSS")
        )
        summary = json.loads(next(Path(root).glob("runs/*/nightly/*/summary.json")).read_text())
        manifest = json.loads((Path(root) / summary["manifest_key"]).read_text())
        checkpoint = max(Path(root).glob("runs/*/checkpoints/*.pt"), key=lambda p: p.stat().st_size)
        batch = 64  # train.batch_size's default, per worker
        images = night_images(quick)  # x evaluate.repeats = 1
        units = {
            "shard": sum(int(s["count"]) for s in manifest["splits"].values()),
            "train": summary["trained_steps"] * batch * workers,
            "sample": images,
            "evaluate": images,
        }
        return Night(
            workers=workers,
            wall_s=wall,
            driver_mb=int(rss) / 1024,
            units=units,
            stages={s["name"]: s for s in summary["stages"]},
            checkpoint_bytes=checkpoint.stat().st_size,
        )


def night_images(quick: bool) -> int:
    return 32 if quick else 128


TASKS_HERE = 4  # sample.images_per_task = night_images / 4


def usage(night: Night, stage: str) -> dict[str, Any]:
    u = night.stages.get(stage, {}).get("usage") or {}
    return {
        "device_s": float(u.get("cpu_s", 0.0)) + float(u.get("gpu_s", 0.0)),
        "bytes": int(u.get("bytes_read", 0)) + int(u.get("bytes_written", 0)),
        "requests": sum(int(n) for n in (u.get("requests") or {}).values()),
        "wall_s": float(night.stages.get(stage, {}).get("seconds", 0.0)),
    }


def checkpoint_on_cluster_network(model: dict[str, Any]) -> tuple[int, float]:
    """Bytes and local write seconds of a checkpoint of the cluster config's network, with its
    EMA and a populated AdamW state (one step), as rank 0 writes it."""
    cfg = UNetConfig(
        in_channels=3,
        image_size=32,
        base_channels=model["base_channels"],
        channel_mult=tuple(model["channel_mult"]),
        num_res_blocks=model["num_res_blocks"],
        attention_resolutions=tuple(model["attention_resolutions"]),
        dropout=model["dropout"],
        num_classes=10 if model.get("class_conditional") else None,
    )
    net = UNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    labels = torch.zeros(2, dtype=torch.long) if cfg.num_classes else None
    ab = alpha_bar_from_betas(linear_betas(1000))
    training_loss(net, x0, labels, alpha_bar=ab).backward()
    opt.step()
    state = {
        "model": net.state_dict(),
        "ema": EMA(net).state_dict(),
        "optimizer": opt.state_dict(),
        "step": 1,
        "config": {"model": model},
    }
    start = time.perf_counter()
    data = save_checkpoint(state)
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        return len(data), time.perf_counter() - start


# -- 2. check ------------------------------------------------------------------------------------
def predict(one: Night, workers: int, units: dict[str, int]) -> dict[str, dict[str, float]]:
    """Each stage of a night with `workers` workers, from the 1-worker night."""
    out = {}
    for stage in STAGES:
        u, n1 = usage(one, stage), max(one.units[stage], 1)
        scale = units[stage] / n1
        work = u["device_s"] * scale
        fixed = max(u["wall_s"] - u["device_s"], 0.0)
        out[stage] = {
            "wall_s": fixed + work / workers,
            "requests": u["requests"] * scale,
            "bytes": u["bytes"] * scale,
        }
    return out


def error(pred: float, meas: float) -> str:
    return "n/a" if meas == 0 else f"{100 * (pred - meas) / meas:+.0f}%"


# -- 3. project ----------------------------------------------------------------------------------
def project(
    cluster: dict[str, Any],
    gpus: int,
    one: Night,
    checkpoint: tuple[int, float],
    train_ips: float,
    score_ips: float,
) -> dict[str, Any]:
    """The cluster config's night on `gpus` GPUs (one worker per GPU, per-GPU batch fixed)."""
    tr, sa, ev = cluster["train"], cluster["sample"], cluster["evaluate"]
    fwd = RATES["forwards_per_train_image"][0]
    steps = tr.get("steps_per_night") or tr["steps"]
    train_images = steps * tr["batch_size"] * gpus
    images = sa["num_images"] * ev.get("repeats", 1)
    tasks = math.ceil(images / sa["images_per_task"])
    busy = min(gpus, tasks)  # a seed range is one task on one GPU: more GPUs than tasks idle
    sample_ips = train_ips * fwd / sa["steps"]
    ckpt_bytes, ckpt_local_s = checkpoint
    stall = ckpt_bytes / RATES["node_upload_Bps"][0] + ckpt_local_s
    train_s = steps * tr["batch_size"] / train_ips + stall * steps / tr["checkpoint_every"]
    # Training's store traffic is per image (shard streaming; checkpoints per step); bytes scale
    # from 8x8x1 digits to 32x32x3 CIFAR-10. Sampling's and scoring's are per seed-range task (a
    # shard, its receipt, its features; each worker's weights), measured over TASKS_HERE tasks.
    pixels = 32 * 32 * 3 / (8 * 8 * 1)
    tr_u, sa_u, ev_u = usage(one, "train"), usage(one, "sample"), usage(one, "evaluate")
    per_image = max(one.units["train"], 1)
    train_rps = tr_u["requests"] / per_image * train_ips * gpus
    train_bps = tr_u["bytes"] / per_image * pixels * train_ips * gpus
    grow = sa["images_per_task"] / (one.units["sample"] / TASKS_HERE)  # images per shard
    sample_tps = busy * sample_ips / sa["images_per_task"]
    score_tps = busy * score_ips / sa["images_per_task"]
    sample_rps = sa_u["requests"] / TASKS_HERE * sample_tps
    sample_bps = sa_u["bytes"] / TASKS_HERE * pixels * grow * sample_tps
    score_rps = ev_u["requests"] / TASKS_HERE * score_tps
    score_bps = ev_u["bytes"] / TASKS_HERE * score_tps
    return {
        "gpus": gpus,
        "train_s": train_s,
        "train_images": train_images,
        "sample_s": images / (sample_ips * busy),
        "evaluate_s": images / (score_ips * busy),
        "busy_gpus": busy,
        "tasks": tasks,
        "stall_s": stall,
        "stall_share": stall / (tr["checkpoint_every"] * tr["batch_size"] / train_ips),
        "rps": max(train_rps, sample_rps, score_rps),
        "Bps": max(train_bps, sample_bps, score_bps),
        "driver_mb": one.driver_mb,
        "shards": tasks,
        "features": tasks,
    }


def bottleneck(p: dict[str, Any]) -> str:
    if p["busy_gpus"] < p["gpus"]:
        return (
            f"sampling/scoring parallelism: {p['tasks']} seed-range tasks keep only "
            f"{p['busy_gpus']} of {p['gpus']} GPUs busy"
        )
    if p["rps"] > RATES["prefix_get_rps"][0]:
        return f"object-store request rate ({p['rps']:.0f}/s > one prefix's S3 limit)"
    if p["stall_share"] > 0.05:
        return f"checkpoint stall ({100 * p['stall_share']:.0f}% of training)"
    return "training compute (GPU-bound)"


def main() -> None:
    args = parse_args()
    setup_process()
    cluster = yaml.safe_load(CLUSTER.read_text())
    train_ips = args.train_ips or RATES["train_ips"][0]
    score_ips = args.score_ips or RATES["score_ips"][0]
    began = time.perf_counter()
    one, two = run_night(1, args.quick), run_night(2, args.quick)
    size, write_s = checkpoint_on_cluster_network(cluster["model"])

    lines = [
        f"Measured: two nights of `diffpipe nightly` (digits, local store), "
        f"{' '.join(night_settings(1, args.quick)[2:])}; workers 1 then 2; "
        f"{time.perf_counter() - began:.0f} s in all{' (--quick: not for use)' if args.quick else ''}.",
        "",
        "| stage | units (1 worker) | device-s per unit | requests per unit | bytes per unit |",
        "|---|---|---|---|---|",
    ]
    for stage in STAGES:
        u, n = usage(one, stage), max(one.units[stage], 1)
        lines.append(
            f"| {stage} | {one.units[stage]} | {u['device_s'] / n:.2e} | "
            f"{u['requests'] / n:.3f} | {u['bytes'] / n:.0f} |"
        )
    lines += [
        "",
        f"Checkpoint here: {one.checkpoint_bytes / 1e6:.2f} MB. Cluster network's checkpoint "
        f"(model + EMA + AdamW): {size / 1e6:.0f} MB, serialized and written locally in "
        f"{write_s:.2f} s. Driver peak RSS: {one.driver_mb:.0f} MB (1 worker), "
        f"{two.driver_mb:.0f} MB (2 workers).",
        "",
        "Prediction of the 2-worker night from the 1-worker night:",
        "",
        "| stage | wall predicted | wall measured | error | requests predicted / measured "
        "| bytes predicted / measured |",
        "|---|---|---|---|---|---|",
    ]
    pred = predict(one, 2, two.units)
    for stage in STAGES:
        m, p = usage(two, stage), pred[stage]
        lines.append(
            f"| {stage} | {p['wall_s']:.1f} s | {m['wall_s']:.1f} s | "
            f"{error(p['wall_s'], m['wall_s'])} | {p['requests']:.0f} / {m['requests']} "
            f"({error(p['requests'], m['requests'])}) | {p['bytes'] / 1e6:.2f} / "
            f"{m['bytes'] / 1e6:.2f} MB ({error(p['bytes'], m['bytes'])}) |"
        )
    lines += [
        "",
        f"Projection of `{CLUSTER.relative_to(REPO)}` (one worker per GPU), rates:",
        "",
        *(f"- {name}: {value:g} ({source})" for name, (value, source) in RATES.items()),
        f"- used: training {train_ips:g} img/s per GPU, scoring {score_ips:g} img/s per GPU",
        "",
        "| GPUs | train | sample | evaluate | GPUs busy sampling | checkpoint stall (share) "
        "| store requests/s (peak stage) | store MB/s | driver MB | shards / feature files "
        "| first bottleneck |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for gpus in SCALES:
        p = project(cluster, gpus, one, (size, write_s), train_ips, score_ips)
        lines.append(
            f"| {gpus} | {p['train_s'] / 3600:.2f} h ({p['train_images'] / 1e6:.1f} Mimg) | "
            f"{p['sample_s'] / 60:.1f} min | {p['evaluate_s'] / 60:.1f} min | {p['busy_gpus']} | "
            f"{p['stall_s']:.1f} s ({100 * p['stall_share']:.1f}%) | {p['rps']:.0f} | "
            f"{p['Bps'] / 1e6:.1f} | {p['driver_mb']:.0f} | {p['shards']} / {p['features']} | "
            f"{bottleneck(p)} |"
        )
    body = "\n".join(lines)
    print(body)
    print(f"wrote {write_results(args.out, 'Capacity model of the nightly', 'cpu', body)}")


if __name__ == "__main__":
    main()
