"""A capacity model of the nightly: measured work per unit here, projected onto N GPUs.

1. Measure. The whole nightly (`diffpipe nightly`, the Quickstart's `digits`, a local store) runs
   three times, each in a fresh driver process and store: A = 1 worker per stage at size n
   (images sharded, training steps, images sampled and scored), B = 1 worker at 2n, C = 2 workers
   at 2n. Each night's summary records, per stage, its wall time and its usage counted where the
   work happened (`tasks.usage`: CPU and GPU seconds, bytes read and written, object-store
   requests by kind); the driver reports its own peak RSS. Evaluation's reference set is capped
   (`evaluate.max_reference_images`) so that only the scored images grow with n.
2. Fit. From A and B, per stage and per quantity, `quantity = fixed + per_unit x units`: a night's
   fixed costs (start-up, the manifest, reference statistics, each worker's weights) apart from
   its work. The unit is the stage's images, except training's writes (checkpoints, logs), which
   follow its steps: with 2 data-parallel workers a step trains twice the images but rank 0 alone
   writes.
3. Check. The fit predicts C: each quantity at C's units; the wall time's per-unit part divided
   among C's workers. The error per stage (wall time, device seconds, requests, bytes) is printed.
4. Project `configs/nightly-cluster.yaml` on N = 1, 8, 64, 1,000 GPUs with the per-GPU rates below
   (each cited; `bash benchmarks/gpu.sh` measures them): stage times, store request rates against
   S3's per-prefix limits, bandwidth, checkpoint stall, driver memory, shards and feature files per
   night, and the first limit crossed as N grows. Checkpoints come from the cluster's network, not
   from the fit: its checkpoint (model + EMA + AdamW state) is saved here with
   `diffusion_core.checkpoint`, written `steps_per_night / checkpoint_every` times a night.

    uv run python -m benchmarks.capacity            # ~10 minutes on 2 quiet cores
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
from tasks.usage import KINDS
from tests.support.paths import REPO

CLUSTER = REPO / "configs" / "nightly-cluster.yaml"
SCALES = (1, 8, 64, 1000)
STAGES = ("shard", "train", "sample", "evaluate")
QUANTITIES = ("wall_s", "device_s", "bytes_read", "bytes_written", *KINDS)
# S3's two request classes. LIST is not named in the limits; it is counted with GET here.
GET_CLASS = ("get", "head", "list", "other")
PUT_CLASS = ("put", "part", "delete")
# Bytes that carry images grow from digits' 8x8x1 to CIFAR-10's 32x32x3; the others (weights,
# receipts, 2048-float Inception features per image) do not. An image's bytes in a shard are mostly
# tar headers and padding at 8x8, so they do not grow 48-fold: a shard's bytes per image here plus
# the raw pixels' growth (an upper bound of PNG's) over the same (`image_bytes_scale`).
PIXEL_GROWTH = 32 * 32 * 3 - 8 * 8 * 1  # bytes per image, uint8
IMAGE_BYTES = {("shard", "bytes_written"), ("train", "bytes_read"), ("sample", "bytes_written")}
IMAGE_BYTES |= {("evaluate", "bytes_read")}
S3_PART = 50 * 2**20  # s3fs's default block size: one UploadPart per 50 MiB of a checkpoint

# Per-GPU rates and store limits for the projection, with their sources.
RATES = {
    # EDM (Karras et al. 2022, github.com/NVlabs/edm README: "CIFAR-10 ... ~2 days on 8 V100",
    # 200 Mimg) ~ 145 img/s per V100 for a 56M-parameter CIFAR-10 network.
    "train_ips": (145.0, "EDM: ~145 img/s per V100, CIFAR-10 32x32 (Karras et al. 2022)"),
    # A sampled image costs NFE forward passes; a trained one ~3 (forward + backward ~ 2 forwards,
    # Kaplan et al. 2020's 6N vs 2N FLOPs per token), so sampling img/s ~ train img/s x 3 / NFE.
    "forwards_per_train_image": (3.0, "forward + backward = 3 forwards (6N vs 2N FLOPs)"),
    # InceptionV3 at 299x299: 5.7 GFLOPs per image (Szegedy et al. 2016); at ~8 TFLOP/s achieved
    # on a V100 in fp32 (half its 15.7 peak) ~ 1,400 img/s.
    "score_ips": (1400.0, "InceptionV3 5.7 GFLOP/img at ~8 TFLOP/s achieved (V100 fp32)"),
    # Rank 0 writes a checkpoint through `Store` -> s3fs, whose S3File uploads its 50 MiB parts
    # one after another (s3fs core.py, S3File._upload_chunk): one connection. AWS's S3
    # performance guidelines ("Horizontal scaling of storage connections") size one connection
    # at 85-90 MB/s.
    "checkpoint_Bps": (
        85e6,
        "one S3 connection ~85-90 MB/s (AWS S3 performance guidelines); "
        "s3fs uploads a file's parts sequentially",
    ),
    # AWS S3 (docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html).
    "prefix_get_rps": (5500.0, "S3: 5,500 GET/HEAD per second per partitioned prefix"),
    "prefix_put_rps": (3500.0, "S3: 3,500 PUT/COPY/POST/DELETE per second per partitioned prefix"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small nights: checks the script only")
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


@dataclass(frozen=True)
class Size:
    """One night's size: `scale` x the base night (1 = n, 2 = 2n)."""

    workers: int
    scale: int
    quick: bool

    @property
    def steps(self) -> int:
        return (20 if self.quick else 150) * self.scale

    @property
    def images(self) -> int:  # sampled, then scored (evaluate.repeats = 1)
        return (16 if self.quick else 64) * self.scale

    @property
    def source_images(self) -> int:  # data.max_images: the images sharded
        return (400 if self.quick else 800) * self.scale

    @property
    def batch(self) -> int:  # per worker
        return 16 if self.quick else 64

    @property
    def images_per_task(self) -> int:  # fixed: a larger night has more seed-range tasks
        return 8 if self.quick else 16

    @property
    def checkpoint_every(self) -> int:
        return 10 if self.quick else 50

    def settings(self) -> list[str]:
        w = self.workers
        quick = [
            "model.base_channels=16",
            "model.channel_mult=[1,2]",
            "model.attention_resolutions=[4]",
            "data.samples_per_shard=64",
            "ray.num_cpus=2",
        ]
        return [
            f"data.max_images={self.source_images}",
            f"data.workers={w}",
            f"train.workers={w}",
            f"train.batch_size={self.batch}",
            f"train.steps={self.steps}",
            f"train.steps_per_night={self.steps}",
            f"train.checkpoint_every={self.checkpoint_every}",
            f"sample.workers={w}",
            f"sample.num_images={self.images}",
            "sample.steps=10",
            f"sample.images_per_task={self.images_per_task}",
            f"evaluate.workers={w}",
            "evaluate.repeats=1",
            'evaluate.metrics=["fid"]',
            f"evaluate.max_reference_images={32 if self.quick else 64}",
            f"evaluate.grid_images={16 if self.quick else 64}",
            *(quick if self.quick else []),
        ]


@dataclass
class Night:
    workers: int
    wall_s: float
    driver_mb: float
    tasks: int  # seed-range tasks: sample shards, feature files
    units: dict[str, dict[str, float]]  # per stage: {"images": n, "steps": s}
    measured: dict[str, dict[str, float]]  # per stage: QUANTITIES
    checkpoint_bytes: int


def usage_quantities(stage: dict[str, Any] | None) -> dict[str, float]:
    """A summary's stage (StageTiming as JSON) as QUANTITIES: wall and device seconds, bytes read
    and written, requests by kind."""
    stage = stage or {}
    u = stage.get("usage") or {}
    requests = u.get("requests") or {}
    out = {
        "wall_s": float(stage.get("seconds", 0.0)),
        "device_s": float(u.get("cpu_s", 0.0)) + float(u.get("gpu_s", 0.0)),
        "bytes_read": float(u.get("bytes_read", 0)),
        "bytes_written": float(u.get("bytes_written", 0)),
    }
    out.update({k: float(requests.get(k, 0)) for k in KINDS})
    return out


def run_night(size: Size) -> Night:
    with tempfile.TemporaryDirectory(prefix="capacity-") as root:
        cmd = [sys.executable, "-c", DRIVER, "nightly", f"storage.root={root}", *size.settings()]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the night {size} failed:\n{done.stdout}\n{done.stderr}")
        rss = next(
            line.split()[1] for line in done.stdout.splitlines() if line.startswith("DRIVER_MAXRSS")
        )
        summary = json.loads(next(Path(root).glob("runs/*/nightly/*/summary.json")).read_text())
        manifest = json.loads((Path(root) / summary["manifest_key"]).read_text())
        checkpoint = max(Path(root).glob("runs/*/checkpoints/*.pt"), key=lambda p: p.stat().st_size)
        steps = int(summary["trained_steps"])
        stages = {s["name"]: s for s in summary["stages"]}
        return Night(
            workers=size.workers,
            wall_s=wall,
            driver_mb=int(rss) / 1024,
            tasks=math.ceil(size.images / size.images_per_task),
            units={
                "shard": {"images": sum(int(s["count"]) for s in manifest["splits"].values())},
                "train": {"images": steps * size.batch * size.workers, "steps": steps},
                "sample": {"images": size.images},
                "evaluate": {"images": size.images},
            },
            measured={stage: usage_quantities(stages.get(stage)) for stage in STAGES},
            checkpoint_bytes=checkpoint.stat().st_size,
        )


def checkpoint_on_cluster_network(model: dict[str, Any]) -> tuple[int, float]:
    """Bytes and local serialize-and-write seconds of a checkpoint of the cluster config's
    network, with its EMA and a populated AdamW state (one step), as rank 0 writes it."""
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


# -- 2. fit and 3. check (pure) ------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """quantity = fixed + per_unit x units."""

    fixed: float
    per_unit: float

    def at(self, units: float) -> float:
        return self.fixed + self.per_unit * units


def fit_line(x1: float, y1: float, x2: float, y2: float) -> Line:
    """The line through two measurements (x: units, y: the quantity)."""
    if x1 == x2:
        raise ValueError(f"two sizes are needed to separate fixed from per-unit costs: x = {x1}")
    per_unit = (y2 - y1) / (x2 - x1)
    return Line(fixed=y1 - per_unit * x1, per_unit=per_unit)


# Training's quantities that rank 0's checkpoints drive (the .pt, latest.json, pruning's listing
# and deletes): they follow the steps, whatever the workers.
TRAIN_BY_STEP = ("bytes_written", "put", "part", "delete", "list")


def unit_of(stage: str, quantity: str) -> str:
    """What a quantity grows with: the stage's images, except training's checkpoint-driven
    writes, listings and deletes, which follow its steps."""
    return "steps" if stage == "train" and quantity in TRAIN_BY_STEP else "images"


Model = dict[str, dict[str, Line]]  # stage -> quantity -> line


def fit_stages(
    units: tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]],
    measured: tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]],
) -> Model:
    """Per stage and quantity, the line through two nights of one worker at two sizes."""
    (ua, ub), (ma, mb) = units, measured
    model: Model = {}
    for stage in STAGES:
        model[stage] = {}
        for q in QUANTITIES:
            unit = unit_of(stage, q)
            model[stage][q] = fit_line(ua[stage][unit], ma[stage][q], ub[stage][unit], mb[stage][q])
    return model


def predict(
    model: Model, units: dict[str, dict[str, float]], workers: int
) -> dict[str, dict[str, float]]:
    """Each stage's quantities at `units` with `workers` workers: the wall time's per-unit part
    divides among the workers; everything else is the line at the units."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        out[stage] = {}
        for q, line in model[stage].items():
            x = units[stage][unit_of(stage, q)]
            out[stage][q] = line.fixed + line.per_unit * x / (workers if q == "wall_s" else 1)
    return out


def totals(q: dict[str, float]) -> dict[str, float]:
    """The quantities the check reports: wall, device seconds, requests, bytes."""
    return {
        "wall_s": q["wall_s"],
        "device_s": q["device_s"],
        "requests": sum(q[k] for k in KINDS),
        "bytes": q["bytes_read"] + q["bytes_written"],
    }


def error(pred: float, meas: float) -> float | None:
    """Relative error of a prediction (None where nothing was measured)."""
    return None if meas == 0 else (pred - meas) / meas


def percent(e: float | None) -> str:
    return "n/a" if e is None else f"{100 * e:+.0f}%"


# -- 4. project (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    train_ips: float  # per GPU
    score_ips: float  # per GPU
    checkpoint_Bps: float  # one checkpoint write's bandwidth
    get_rps: float  # per prefix
    put_rps: float


def default_rates(train_ips: float | None = None, score_ips: float | None = None) -> Rates:
    return Rates(
        train_ips=train_ips or RATES["train_ips"][0],
        score_ips=score_ips or RATES["score_ips"][0],
        checkpoint_Bps=RATES["checkpoint_Bps"][0],
        get_rps=RATES["prefix_get_rps"][0],
        put_rps=RATES["prefix_put_rps"][0],
    )


@dataclass(frozen=True)
class Measured:
    """What the projection takes from here: the fit, the seed-range size it was measured at, the
    driver's memory (a line in seed-range tasks, plus MB per extra actor), the cluster network's
    checkpoint (bytes, local serialize + write seconds) and the night's checkpoint interval here
    (training's step-driven requests x it = one checkpoint's requests)."""

    model: Model
    images_per_task: int
    driver: Line
    driver_mb_per_worker: float
    checkpoint_bytes: int
    checkpoint_local_s: float
    checkpoint_every: int
    image_bytes_scale: float  # an image's bytes at CIFAR-10's size / at digits'


def image_bytes_scale(shard_bytes_per_image: float) -> float:
    """CIFAR-10's bytes per image in a shard over digits', from digits' measured bytes per image
    in a shard (the shard stage's per-unit bytes written)."""
    if shard_bytes_per_image <= 0:
        raise ValueError(f"the shard stage wrote {shard_bytes_per_image} bytes per image")
    return 1 + PIXEL_GROWTH / shard_bytes_per_image


def _per_unit(m: Measured, stage: str, quantity: str) -> float:
    """A per-unit cost, at CIFAR-10's size where it is pixels; never below zero (noise)."""
    scale = m.image_bytes_scale if (stage, quantity) in IMAGE_BYTES else 1.0
    return max(m.model[stage][quantity].per_unit, 0.0) * scale


def _rates(m: Measured, stage: str, units_per_s: float, per_task: float) -> dict[str, float]:
    """A stage's steady store traffic at `units_per_s` images a second, from its per-image costs.
    `per_task` rescales request counts from the seed-range size here to the cluster's (requests
    are per task, not per image)."""

    def per_image(kinds: tuple[str, ...]) -> float:
        return sum(_per_unit(m, stage, k) for k in kinds if unit_of(stage, k) == "images")

    get = per_image(GET_CLASS) * per_task * units_per_s
    put = per_image(PUT_CLASS) * per_task * units_per_s
    Bps = (_per_unit(m, stage, "bytes_read") + _per_unit(m, stage, "bytes_written")) * units_per_s
    return {"get_rps": get, "put_rps": put, "Bps": Bps}


def project(cluster: dict[str, Any], gpus: int, m: Measured, rates: Rates) -> dict[str, Any]:
    """The cluster config's night on `gpus` GPUs (one worker per GPU, the per-GPU batch fixed:
    more GPUs train more images in the same night, and split sampling and scoring into more
    parallel seed-range tasks, up to one per task)."""
    tr, sa, ev = cluster["train"], cluster["sample"], cluster["evaluate"]
    steps = tr.get("steps_per_night") or tr["steps"]
    images = sa["num_images"] * ev.get("repeats", 1)
    tasks = math.ceil(images / sa["images_per_task"])
    busy = min(gpus, tasks)  # a seed range is one task on one GPU: more GPUs than tasks idle
    sample_ips = rates.train_ips * RATES["forwards_per_train_image"][0] / sa["steps"]

    # Checkpoints: rank 0 writes the cluster network's, `writes` times, one connection each.
    writes = steps // tr["checkpoint_every"]
    stall = m.checkpoint_bytes / rates.checkpoint_Bps + m.checkpoint_local_s
    compute_s = steps * tr["batch_size"] / rates.train_ips
    train_s = compute_s + writes * stall
    # One checkpoint's requests here (the .pt one PUT on a local store); on S3 the .pt is a
    # multipart upload: create, one part per 50 MiB, complete.
    here = {k: _per_unit(m, "train", k) * m.checkpoint_every for k in TRAIN_BY_STEP}
    puts_per_write = math.ceil(m.checkpoint_bytes / S3_PART) + 2 + max(here["put"] - 1, 0.0)
    puts_per_write += here["part"] + here["delete"]

    train = _rates(m, "train", rates.train_ips * gpus, 1.0)
    train["get_rps"] += writes * here["list"] / train_s
    train["put_rps"] = writes * puts_per_write / train_s
    train["Bps"] = (
        _per_unit(m, "train", "bytes_read") * rates.train_ips * gpus
        + writes * m.checkpoint_bytes / train_s
    )
    per_task = m.images_per_task / sa["images_per_task"]
    sample = _rates(m, "sample", sample_ips * busy, per_task)
    evaluate = _rates(m, "evaluate", rates.score_ips * busy, per_task)
    stages = {"train": train, "sample": sample, "evaluate": evaluate}
    return {
        "gpus": gpus,
        "train_s": train_s,
        "train_images": steps * tr["batch_size"] * gpus,
        "sample_s": images / (sample_ips * busy),
        "evaluate_s": images / (rates.score_ips * busy),
        "busy_gpus": busy,
        "tasks": tasks,
        "writes": writes,
        "stall_s": stall,
        "stall_share": writes * stall / train_s,
        "stages": stages,
        "get_rps": max(s["get_rps"] for s in stages.values()),  # the stages run one at a time
        "put_rps": max(s["put_rps"] for s in stages.values()),
        "Bps": max(s["Bps"] for s in stages.values()),
        # The driver holds a handle per sampling and scoring actor (one per busy GPU); training's
        # workers are Ray Train's controller's, not the driver's.
        "driver_mb": m.driver.at(tasks) + m.driver_mb_per_worker * (busy - 1),
        "shards": tasks,
        "features": tasks,
    }


def first_limits(cluster: dict[str, Any], m: Measured, rates: Rates) -> list[tuple[float, str]]:
    """The GPU counts at which each limit is crossed, first first: sampling and scoring stop
    scaling past one GPU per seed-range task; a stage's request rate passes one S3 prefix's."""
    one = project(cluster, 1, m, rates)
    tasks = one["tasks"]
    limits: list[tuple[float, str]] = [
        (
            tasks + 1,
            f"seed-range tasks: {tasks} per night, so sampling and scoring stop getting faster "
            f"past {tasks} GPUs",
        )
    ]
    # Request rates grow linearly with the GPUs at work (training: all; sampling, scoring: up to
    # one per task), so one GPU's rate gives the crossing. Training's writes are rank 0's
    # checkpoints: the same at every N.
    for name, stage in (("training", "train"), ("sampling", "sample"), ("scoring", "evaluate")):
        for kind, limit in (("get_rps", rates.get_rps), ("put_rps", rates.put_rps)):
            rate = one["stages"][stage][kind]
            if rate <= 0 or (stage == "train" and kind == "put_rps"):
                continue
            n = math.ceil(limit / rate)
            if stage != "train" and n > tasks:
                continue  # never reached: at most `tasks` GPUs work at once
            cls = "GET/HEAD/LIST" if kind == "get_rps" else "PUT/POST/DELETE"
            limits.append((n, f"{name}'s {cls} requests pass S3's {limit:,.0f}/s per prefix"))
    return sorted(limits)


# -- report --------------------------------------------------------------------------------------
def measured_table(a: Night, b: Night, model: Model) -> list[str]:
    lines = [
        "| stage | quantity | unit | A (1 worker, n) | B (1 worker, 2n) | fixed | per unit |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        for q in QUANTITIES:
            if a.measured[stage][q] == 0 and b.measured[stage][q] == 0:
                continue
            line, unit = model[stage][q], unit_of(stage, q)
            lines.append(
                f"| {stage} | {q} | {unit} ({a.units[stage][unit]:g} / {b.units[stage][unit]:g})"
                f" | {a.measured[stage][q]:.4g} | {b.measured[stage][q]:.4g} | {line.fixed:.4g} "
                f"| {line.per_unit:.3g} |"
            )
    return lines


def check_table(model: Model, c: Night) -> list[str]:
    pred = predict(model, c.units, c.workers)
    lines = [
        "| stage | wall s: predicted / measured (error) | device s | requests | MB |",
        "|---|---|---|---|---|",
    ]
    for stage in STAGES:
        p, m = totals(pred[stage]), totals(c.measured[stage])
        cells = []
        for q, fmt in (
            ("wall_s", ".1f"),
            ("device_s", ".1f"),
            ("requests", ".0f"),
            ("bytes", ".2f"),
        ):
            div = 1e6 if q == "bytes" else 1.0
            cells.append(f"{p[q] / div:{fmt}} / {m[q] / div:{fmt}} ({percent(error(p[q], m[q]))})")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def projection_table(cluster: dict[str, Any], m: Measured, rates: Rates) -> list[str]:
    lines = [
        "| GPUs | train | sample | evaluate | GPUs busy sampling | checkpoint stall per write "
        "(share of training) | GET/s peak | PUT/s peak | store MB/s peak | driver MB "
        "| shards / feature files |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for gpus in SCALES:
        p = project(cluster, gpus, m, rates)
        lines.append(
            f"| {gpus:,} | {p['train_s'] / 3600:.2f} h ({p['train_images'] / 1e6:.1f} Mimg) | "
            f"{p['sample_s'] / 60:.1f} min | {p['evaluate_s'] / 60:.1f} min | {p['busy_gpus']} | "
            f"{p['stall_s']:.1f} s x {p['writes']} ({100 * p['stall_share']:.1f}%) | "
            f"{p['get_rps']:,.0f} | {p['put_rps']:,.1f} | {p['Bps'] / 1e6:,.1f} | "
            f"{p['driver_mb']:,.0f} | {p['shards']} / {p['features']} |"
        )
    return lines


def main() -> None:
    args = parse_args()
    setup_process()
    cluster = yaml.safe_load(CLUSTER.read_text())
    rates = default_rates(args.train_ips, args.score_ips)
    began = time.perf_counter()
    sizes = (Size(1, 1, args.quick), Size(1, 2, args.quick), Size(2, 2, args.quick))
    a, b, c = (run_night(s) for s in sizes)
    size, write_s = checkpoint_on_cluster_network(cluster["model"])

    model = fit_stages((a.units, b.units), (a.measured, b.measured))
    driver = fit_line(a.tasks, a.driver_mb, b.tasks, b.driver_mb)
    measured = Measured(
        model=model,
        images_per_task=sizes[0].images_per_task,
        driver=driver,
        driver_mb_per_worker=max(c.driver_mb - b.driver_mb, 0.0) / (c.workers - 1),
        checkpoint_bytes=size,
        checkpoint_local_s=write_s,
        checkpoint_every=sizes[0].checkpoint_every,
        image_bytes_scale=image_bytes_scale(model["shard"]["bytes_written"].per_unit),
    )
    limits = first_limits(cluster, measured, rates)
    pred_c = predict(model, c.units, c.workers)
    worst = max(
        (abs(e), stage, q)
        for stage in STAGES
        for q in ("wall_s", "requests", "bytes")
        if (e := error(totals(pred_c[stage])[q], totals(c.measured[stage])[q])) is not None
    )

    base = " ".join(sizes[0].settings())
    lines = [
        f"Measured: three nights of `diffpipe nightly` (digits, local store): A = 1 worker at n, "
        f"B = 1 worker at 2n, C = 2 workers at 2n; n = `{base}` (B and C double max_images, "
        f"steps and num_images). Night walls A/B/C {a.wall_s:.0f} / {b.wall_s:.0f} / "
        f"{c.wall_s:.0f} s; {time.perf_counter() - began:.0f} s in all"
        f"{' (--quick: not for use)' if args.quick else ''}.",
        "",
        "Fit per stage, quantity = fixed + per unit x units, through A and B (requests by kind; "
        "seconds; bytes):",
        "",
        *measured_table(a, b, model),
        "",
        f"Prediction of night C (2 workers, 2n) from the fit; largest error {100 * worst[0]:.0f}% "
        f"({worst[1]} {worst[2]}):",
        "",
        *check_table(model, c),
        "",
        f"Driver peak RSS: A {a.driver_mb:.0f} MB ({a.tasks} tasks), B {b.driver_mb:.0f} MB "
        f"({b.tasks} tasks), C {c.driver_mb:.0f} MB (2 workers): {driver.fixed:.0f} MB + "
        f"{driver.per_unit:.2f} MB per task + {measured.driver_mb_per_worker:.1f} MB per extra "
        f"worker. Checkpoint here: {a.checkpoint_bytes / 1e6:.2f} MB. Cluster network's checkpoint "
        f"(model + EMA + AdamW): {size / 1e6:.0f} MB, serialized and written locally in "
        f"{write_s:.2f} s.",
        "",
        f"Projection of `{CLUSTER.relative_to(REPO)}` (one worker per GPU; rates and limits):",
        "",
        *(f"- {name}: {value:g} ({source})" for name, (value, source) in RATES.items()),
        f"- used: training {rates.train_ips:g} img/s per GPU, scoring {rates.score_ips:g} img/s "
        "per GPU; bytes of pixels x "
        f"{measured.image_bytes_scale:.2f} (a digits shard's bytes per image + {PIXEL_GROWTH} raw "
        "pixel bytes, over the former: 8x8x1 -> 32x32x3); requests per seed-range task "
        f"({sizes[0].images_per_task} images here); one prefix for the whole run (a new bucket's "
        "start); the shard stage is reused on the cluster's nights (not projected)",
        "",
        *projection_table(cluster, measured, rates),
        "",
        "Limits in the order N crosses them:",
        "",
        *(f"{i}. N >= {n:,.0f}: {what}" for i, (n, what) in enumerate(limits, 1)),
        "",
        f"**First bottleneck: {limits[0][1]} (from N = {limits[0][0]:,.0f}).**",
    ]
    body = "\n".join(lines)
    print(body)
    print(f"wrote {write_results(args.out, 'Capacity model of the nightly', 'cpu', body)}")


if __name__ == "__main__":
    main()
