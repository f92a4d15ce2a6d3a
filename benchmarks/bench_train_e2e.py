"""End-to-end training throughput: our training loop against the loop a diffusers user writes.

Ours: `tasks.train.loop.run_training` as every Ray Train worker runs it: batches streamed from
the WebDataset shards in the store, decoded in a background data worker, the diffusion loss, AdamW,
gradient clipping, EMA, checkpoints (model + EMA + optimizer) written to the store.

Reference: the loop of diffusers' unconditional-training example (examples/unconditional_image_
generation/train_unconditional.py) without accelerate: `UNet2DModel` of the same architecture,
`DDPMScheduler.add_noise`, AdamW, gradient clipping, `EMAModel`, a `DataLoader` over the same images
as PNG files decoded with PIL and torchvision's ToTensor/Normalize, and the same checkpoints
(`torch.save` of model, EMA and optimizer) every `--checkpoint-every` steps.

Same data (MNIST test set, 28x28), same network config, same batch, same number of data-loading
processes (`--data-workers`), same torch threads. Whole runs alternate (ABBA) after a warm-up run
each; the ratio is of median images/s over a run's wall time (start to last checkpoint).

    uv run python -m benchmarks.bench_train_e2e            # CPU, ~10 min on 2 cores
    uv run python -m benchmarks.bench_train_e2e --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import (
    diffusers_unet,
    mnist_settings,
    n_params,
    time_interleaved,
    write_results,
)
from diffusion_core.unet import UNet
from tasks.config import PipelineConfig, resolve_config
from tasks.records import DatasetManifest
from tasks.runtime import setup_process
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.loop import TrainJob, run_training, unet_config_for
from tasks.webdata import iter_raw_samples


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="MNIST test images to train on")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--attention-resolutions", type=int, nargs="*", default=[7])
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--data-workers", type=int, default=1, help="loader processes, both loops")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both loops")
    p.add_argument("--reps", type=int, default=2, help="timed runs per loop (ABBA)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few images and steps")
    p.add_argument("--out", default="train_e2e.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    if args.quick:
        args.images, args.steps, args.checkpoint_every, args.reps = 600, 8, 4, 1
    return args


def pipeline_config(args: argparse.Namespace, root: Path) -> PipelineConfig:
    return resolve_config(
        PipelineConfig.model_validate(
            {
                "storage": {"root": str(root / "store")},
                "data": mnist_settings(args.images)["data"],
                "model": {
                    "base_channels": args.base_channels,
                    "channel_mult": args.channel_mult,
                    "attention_resolutions": args.attention_resolutions,
                },
                "train": {
                    "batch_size": args.batch,
                    "checkpoint_every": args.checkpoint_every,
                    "log_every": args.checkpoint_every,
                    "loader_processes": args.data_workers,
                    "shuffle_buffer": 1000,
                },
            }
        )
    )


class PngFolder(torch.utils.data.Dataset[torch.Tensor]):
    """The example's dataset: image files decoded with PIL, ToTensor, Normalize([0.5], [0.5])."""

    def __init__(self, files: list[Path]) -> None:
        from torchvision import transforms

        self.files = files
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("L"))


def diffusers_loop(
    cfg: PipelineConfig,
    manifest: DatasetManifest,
    files: list[Path],
    args: argparse.Namespace,
    out: Path,
) -> None:
    """diffusers' train_unconditional.py, as a user writes it, for `args.steps` steps."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = diffusers_unet(unet_config_for(cfg.model, manifest))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True)
    loader = torch.utils.data.DataLoader(
        PngFolder(files),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.data_workers,
    )
    step = 0
    while step < args.steps:
        for clean in loader:
            noise = torch.randn(clean.shape)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],))
            noisy = scheduler.add_noise(clean, noise, t)
            loss = F.mse_loss(model(noisy, t).sample.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            ema.step(model.parameters())
            step += 1
            if step % args.checkpoint_every == 0 or step == args.steps:
                state = {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                }
                torch.save(state, out / f"ref-step-{step}.pt")
            if step == args.steps:
                return


def main() -> None:
    args = parse_args()
    setup_process()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    base = pipeline_config(args, work)
    store = Store(base.storage)
    manifest = shard_dataset(base.data, store).manifest
    # The reference reads the same training images, as PNG files.
    png_dir = work / "png"
    png_dir.mkdir()
    files = []
    for i, sample in enumerate(
        iter_raw_samples(store, [s.key for s in manifest.split("train").shards])
    ):
        path = png_dir / f"{i:06d}.png"
        path.write_bytes(sample["png"])
        files.append(path)

    runs = 0

    def ours() -> None:
        nonlocal runs
        runs += 1
        train = base.train.model_copy(update={"run_id": f"bench-{runs}"})
        run_training(
            TrainJob(
                config=base.model_copy(update={"train": train}),
                target_step=args.steps,
                manifest=manifest,
            )
        )

    def reference() -> None:
        diffusers_loop(base, manifest, files, args, work)

    unet_cfg = unet_config_for(base.model, manifest)
    params = {"ours": n_params(UNet(unet_cfg)), "diffusers": n_params(diffusers_unet(unet_cfg))}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    for run in (ours, reference):  # warm-up: imports, first allocations
        run()
    times = time_interleaved({"ours": ours, "diffusers": reference}, reps=args.reps, device="cpu")
    load_after = os.getloadavg()[0]
    images = args.steps * args.batch
    ips = {name: images / statistics.median(ts) for name, ts in times.items()}
    ratio = ips["ours"] / ips["diffusers"]
    summary = (
        f"end-to-end training ({args.steps} steps x batch {args.batch}, {args.threads} thread(s), "
        f"{args.data_workers} data worker(s)): ours {ips['ours']:.1f} img/s, diffusers-example loop "
        f"{ips['diffusers']:.1f} img/s, ratio ours/diffusers = {ratio:.3f}"
    )
    print(summary)
    body = "\n".join(
        [
            f"Data: {len(files)} MNIST test images (28x28x1) from `{manifest.dataset}` shards (ours) "
            "and as PNG files (reference). "
            f"{args.steps} steps x batch {args.batch} per run, a checkpoint every "
            f"{args.checkpoint_every} steps, {args.threads} torch thread(s), {args.data_workers} "
            f"data-loading process(es) each; {args.reps} timed run(s) each after a warm-up run, ABBA.",
            f"Network: `{unet_cfg.to_dict()}`",
            f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after "
            f"({time.perf_counter() - started:.0f} s in all).",
            "",
            "| loop | parameters | images/s (median run) | run seconds |",
            "|---|---|---|---|",
            f"| ours (`run_training`: shards, background decoding, EMA, checkpoints) | {params['ours']:,} "
            f"| {ips['ours']:.1f} | {', '.join(f'{t:.1f}' for t in times['ours'])} |",
            f"| diffusers example loop (`UNet2DModel`, `DDPMScheduler.add_noise`, AdamW, `EMAModel`, "
            f"PNG `DataLoader`) | {params['diffusers']:,} | {ips['diffusers']:.1f} "
            f"| {', '.join(f'{t:.1f}' for t in times['diffusers'])} |",
            "",
            f"**Ratio ours/diffusers: {ratio:.3f}**",
        ]
    )
    path = write_results(args.out, "End-to-end training throughput", "cpu", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
