"""FID against NFE on the MNIST quality checkpoint: DDIM and DPM-Solver++ 2M with trailing and
logsnr spacing, and Heun with karras spacing, at 10-100 network evaluations per image, every
setting on the same seed ranges; which is the cheapest within the noise of the best.

The sweep as `diffpipe samplers` runs it (`tasks.sample.stage.sample_grid`: one job, one weights
load per actor; `tasks.evaluate.stage.evaluate_sets`: one feature pool, the reference statistics
computed once; `tasks.sample.grid.sampler_choice`; the report of `tasks.report.choice`), on the
checkpoint `benchmarks.bench_quality_mnist` trains (the same config, `--train-steps` steps). The FID
uses the seeded STAND-IN InceptionV3 unless the standard weights are at hand: comparable only with
each other.

    uv run python -m benchmarks.sampler_sweep                       # 20 settings, 3 x 256 images each
    uv run python -m benchmarks.sampler_sweep --quick               # 15 settings, fewer images
    uv run python -m benchmarks.sampler_sweep --store /data/sweep   # keep (and reuse) the store
    uv run python -m benchmarks.sampler_sweep --gpu                 # sample and extract on GPUs
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS_DIR, write_results
from benchmarks.bench_quality_mnist import quality_config
from tasks import layout
from tasks.config import PipelineConfig
from tasks.evaluate.stage import evaluate_sets
from tasks.ray_runtime import ensure_ray
from tasks.records import SamplerChoice
from tasks.report.choice import write_sampler_report
from tasks.runtime import setup_process
from tasks.sample.grid import grid_configs, sampler_choice, use_command
from tasks.sample.stage import sample_grid
from tasks.shard.stage import shard_dataset
from tasks.storage import open_store
from tasks.train.loop import TrainJob, run_training


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer settings, steps and images")
    p.add_argument("--train-steps", type=int, help="train the checkpoint to this step (4000)")
    p.add_argument("--samples", type=int, help="images per seed range (256)")
    p.add_argument("--repeats", type=int, default=3, help="seed ranges per setting (3)")
    p.add_argument("--reference", type=int, help="held-out images for the reference (500)")
    p.add_argument("--store", help="store folder to keep and reuse (default: a temporary one)")
    p.add_argument("--gpu", action="store_true", help="one GPU per sampling and feature actor")
    p.add_argument("--out", default="sampler_sweep.md", help="file name under benchmarks/results/")
    return p.parse_args()


def sweep_grid(quick: bool) -> list[dict[str, Any]]:
    """DDIM and DPM-Solver++ 2M at 10-100 NFE with trailing and logsnr spacing; Heun (2n - 1 NFE
    for n steps) with karras spacing at 9-99 NFE."""
    steps = (10, 20, 50) if quick else (10, 20, 50, 100)
    heun = (5, 10, 25) if quick else (5, 10, 25, 50)
    return [
        *(
            {"sampler": sampler, "spacing": spacing, "steps": n}
            for sampler in ("ddim", "dpmpp_2m")
            for spacing in ("trailing", "logsnr")
            for n in steps
        ),
        *({"sampler": "heun", "spacing": "karras", "steps": n} for n in heun),
    ]


def report(args: argparse.Namespace, choice: SamplerChoice, figure: bytes, seconds: float) -> None:
    k = choice.repeats
    rows = [
        f"| {s.name} | {s.nfe} | {s.mean:.4f} ± {s.std or 0:.4f} | "
        f"{', '.join(f'{v:.4f}' for v in s.values)} | {'yes' if s.within_noise else 'no'} | "
        f"{'CHOSEN' if s.chosen else ('best' if s.best else '')} |"
        for s in sorted(choice.settings, key=lambda s: (s.sampler, s.spacing, s.nfe))
    ]
    (RESULTS_DIR / "sampler_sweep_fid.png").write_bytes(figure)
    chosen, best = choice.chosen, choice.best
    body = "\n".join(
        [
            f"Checkpoint: the MNIST quality proxy's model (`benchmarks.bench_quality_mnist`'s "
            f"config) at step {choice.step}. Every setting sampled the same {k} seed ranges of "
            f"{choice.num_images} images; FID against the held-out split with {choice.extractor}"
            + ("" if choice.comparable_with_published else " (NOT comparable with published FIDs)")
            + ".",
            "",
            "| setting | NFE | FID mean ± std | per seed range | within noise of best | |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"**Chosen: {chosen.name}, {chosen.nfe} NFE** (FID {chosen.mean:.4f}), the cheapest "
            f"that a one-sided paired t-test at alpha {choice.alpha:g} cannot call worse than the "
            f"best ({best.name}, {best.nfe} NFE, FID {best.mean:.4f}). {seconds:.0f} s in all.",
            "",
            "![FID against NFE](sampler_sweep_fid.png)",
        ]
    )
    path = write_results(
        args.out, "Sampler sweep: FID against NFE (MNIST)", "cuda" if args.gpu else "cpu", body
    )
    print(f"chosen: {chosen.name} ({chosen.nfe} NFE); wrote {path}", flush=True)


def main() -> None:
    args = parse_args()
    setup_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_steps = args.train_steps or (400 if args.quick else 4000)
    n_samples = args.samples or (96 if args.quick else 256)
    n_reference = args.reference or (128 if args.quick else 500)
    work = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    started = time.monotonic()
    try:
        tree = quality_config(work, train_steps, n_samples, n_reference).model_dump()
        tree["sample"]["use_gpu"] = args.gpu
        tree["evaluate"].update(use_gpu=args.gpu, repeats=args.repeats, metrics=["fid"])
        cfg = PipelineConfig.model_validate(tree)
        store = open_store(cfg.storage)
        manifest = shard_dataset(cfg.data, store).manifest
        ensure_ray(cfg.ray)
        # resumes (exactly) from a kept store's checkpoint; nothing to do when it is there
        ckpt = run_training(
            TrainJob(config=cfg, target_step=train_steps, manifest=manifest)
        ).checkpoint
        configs = grid_configs(
            cfg.sample,
            sweep_grid(args.quick),
            num_timesteps=ckpt.model.num_timesteps,
            conditional=ckpt.unet.num_classes is not None,
        )
        grid = sample_grid(store, configs, cfg.ray, ckpt, repeats=cfg.evaluate.repeats)
        print(f"sampled {len(configs)} settings; weight loads per actor: {grid.weight_loads}")
        metrics = evaluate_sets(store, cfg.evaluate, cfg.ray, manifest, grid.sets)
        stamp = layout.night_stamp(datetime.now(UTC))
        prefix = layout.sampler_choice_prefix(ckpt.run_id, stamp)
        html_key = layout.sampler_choice_report_html(prefix)
        choice = sampler_choice(
            grid.sets,
            metrics,
            metric="fid",
            alpha=cfg.promote.alpha,
            command={s.name: use_command(None, [], s.config) for s in grid.sets},
            stamp=stamp,
            report_keys=(layout.sampler_choice_report(prefix), html_key),
            report_url=store.url(html_key),
        )
        write_sampler_report(store, choice)
        figure = store.read_bytes(layout.sampler_choice_figure(prefix))
        report(args, choice, figure, time.monotonic() - started)
    finally:
        if not args.store:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
