"""The sampling job: actor-pool scaling and the sampler's overhead over the bare network.

1. Scaling: `tasks.sample.stage.sample_images` (the product's job: actor pool, shards, receipts, manifest)
   with 1 actor x 1 CPU and with 2 actors x 1 CPU each, the same images, on a local Ray cluster;
   images/s of the whole job, actor start included. Target: 2 actors >= 1.8x 1 actor.
2. Overhead: `tasks.sample.generate.generate` (per-image generators, float64 step maths, uint8 images) at
   batch B and NFE n vs the bound the network itself sets, B / (n x one forward of B images), in
   one process and thread count. Target >= 0.95. The whole seed range (PNG + tar) is reported too.

    uv run python -m benchmarks.bench_sampling_job
    uv run python -m benchmarks.bench_sampling_job --quick
    uv run python -m benchmarks.bench_sampling_job --device cuda    # part 2 on a GPU
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks._common import time_interleaved, write_results
from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.unet import UNet, UNetConfig
from tasks import layout
from tasks.config import ModelConfig, RayConfig, SampleConfig, StorageConfig
from tasks.ray_runtime import ensure_ray
from tasks.records import Checkpoint
from tasks.runtime import setup_process
from tasks.sample.generate import SeedRangeSampler, generate
from tasks.sample.stage import sample_images
from tasks.storage import Store
from tests.support.records import checkpoint_record


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", help="device of part 2 (part 1 runs on CPU actors)")
    p.add_argument("--images", type=int, help="images per scaling job")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps = NFE")
    p.add_argument("--reps", type=int, help="timed runs per contender (interleaved)")
    p.add_argument("--out", default="sampling_job.md", help="file name under benchmarks/results/")
    return p.parse_args()


def make_checkpoint(store: Store) -> Checkpoint:
    """A checkpoint of bench_sampling.py's network (16x16x1, 1.19 M parameters)."""
    ucfg = UNetConfig(image_size=16, base_channels=32)
    torch.manual_seed(0)
    net = UNet(ucfg)
    nn.init.normal_(net.conv_out.weight, std=0.02)  # not the zero init: images are not flat
    model = ModelConfig(base_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(8,))
    data = save_checkpoint({"model": net.state_dict(), "step": 1, "config": {}})
    return checkpoint_record(
        1, store, run_id="bench", data=data, unet=ucfg, model=model, dataset_fingerprint="bench"
    )


def scaling(store: Store, ckpt: Checkpoint, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per sampling job with 1 and 2 actors (ABBA); each job samples a fresh set."""
    base = SampleConfig(
        num_images=args.images,
        steps=args.steps,
        batch_size=32,
        images_per_task=32,
        cpus_per_worker=1.0,
        use_ema=False,
    )
    times: dict[str, list[float]] = {"1 actor": [], "2 actors": []}
    seed = 0
    for rep in range(args.reps):
        for name in list(times) if rep % 2 == 0 else list(times)[::-1]:
            cfg = base.model_copy(
                update={"workers": 1 if name == "1 actor" else 2, "seed_start": seed}
            )
            seed += args.images  # a new set every time: nothing to reuse
            start = time.perf_counter()
            sample_images(store, cfg, RayConfig(num_cpus=2), ckpt)
            times[name].append(time.perf_counter() - start)
            print(f"  {name}: {args.images / times[name][-1]:.1f} img/s", flush=True)
    return times


def overhead(
    store: Store, ckpt: Checkpoint, args: argparse.Namespace
) -> tuple[dict[str, float], str]:
    """images/s of generate() and of a whole seed range vs the network's forward bound."""
    cfg = SampleConfig(
        steps=args.steps,
        batch_size=args.batch,
        use_ema=False,
        use_gpu=args.device.startswith("cuda"),
    )
    weights = layout.sample_weights(layout.sample_set_prefix("bench", "overhead"))
    store.write_bytes(weights, store.read_bytes(ckpt.key))  # it holds {"model": ...} too
    sampler = SeedRangeSampler(store.config, ckpt, weights, cfg)
    device = sampler.device
    net = sampler.net
    seeds = list(range(args.batch))
    x = torch.randn(args.batch, 1, 16, 16, device=device)  # float32, as the network gets it
    t = torch.full((args.batch,), 500, device=device)
    calls = {"n": 0}

    def forward_bound() -> None:
        with torch.inference_mode():
            for _ in range(args.steps):
                net(x, t[:1].expand(args.batch))

    def sampler_only() -> None:
        for _ in generate(net, ckpt, seeds, cfg, device):
            pass

    def whole_range() -> None:
        calls["n"] += 1
        n = calls["n"]
        key = f"bench/overhead/{n}.tar"
        sampler.run(10_000 * n, 10_000 * n + args.batch, key, key.replace(".tar", ".json"))

    runs = {
        "network forward x NFE": forward_bound,
        "generate()": sampler_only,
        "seed range": whole_range,
    }
    for run in runs.values():
        run()  # warm-up
    times = time_interleaved(runs, reps=args.reps * 2, device=str(device))
    ips = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
    setting = f"{args.device}, batch {args.batch}, {args.steps} DDIM steps, {torch.get_num_threads()} threads"
    return ips, setting


def main() -> None:
    args = parse_args()
    setup_process()
    args.images = args.images or (256 if args.quick else 1024)
    args.reps = args.reps or (1 if args.quick else 2)
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-sjob-"))
    try:
        store = Store(StorageConfig(root=str(work)))
        ckpt = make_checkpoint(store)
        load_before = os.getloadavg()[0]
        ensure_ray(RayConfig(num_cpus=2))
        times = scaling(store, ckpt, args)
        ips_pool = {name: args.images / statistics.median(ts) for name, ts in times.items()}
        scale = ips_pool["2 actors"] / ips_pool["1 actor"]
        ips, setting = overhead(store, ckpt, args)
        bound = ips["network forward x NFE"]
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = (
        f"scaling: 1 actor {ips_pool['1 actor']:.1f} img/s, 2 actors {ips_pool['2 actors']:.1f} "
        f"img/s, ratio {scale:.2f} (target >= 1.8); overhead ({setting}): generate() "
        f"{ips['generate()']:.1f} img/s vs forward bound {bound:.1f} img/s, ratio "
        f"{ips['generate()'] / bound:.3f} (target >= 0.95)"
    )
    print(summary)
    body = "\n".join(
        [
            "## 1. Actor pool scaling (the product's sampling job)",
            "",
            f"`sample_images`, {args.images} images per job, 16x16x1 UNet (1.19 M parameters), "
            f"{args.steps} DDIM steps, batch 32, 32 images per seed range (one shard each), local "
            f"Ray cluster with 2 CPUs, `sample.cpus_per_worker=1` (torch threads = 1 per actor); "
            f"whole job incl. actor start, {args.reps} run(s) each, interleaved; median.",
            "",
            "| actors | images/s | job s (median) |",
            "|---|---|---|",
            *(
                f"| {name} | {ips_pool[name]:.1f} | {statistics.median(times[name]):.1f} |"
                for name in times
            ),
            "",
            f"**Ratio 2 actors / 1 actor: {scale:.2f}** (target >= 1.8)",
            "",
            "## 2. Sampler overhead over the network's own forward throughput",
            "",
            f"Setting: {setting}. Bound = batch / (NFE x median time of one forward pass of the "
            "batch); `generate()` adds per-image generators, float64 step maths and the uint8 "
            "conversion; `seed range` adds PNG encoding and the tar write (`SeedRangeSampler.run`).",
            "",
            "| pipeline | images/s (median) | ratio to the bound |",
            "|---|---|---|",
            *(f"| {name} | {v:.1f} | {v / bound:.3f} |" for name, v in ips.items()),
            "",
            f"**Ratio generate() / network bound: {ips['generate()'] / bound:.3f}** (target >= 0.95)",
            "",
            f"Load average (1 min): {load_before:.1f} before, {load_after:.1f} after (2 cores).",
        ]
    )
    path = write_results(
        args.out, "Sampling job: actor-pool scaling and sampler overhead", args.device, body
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
