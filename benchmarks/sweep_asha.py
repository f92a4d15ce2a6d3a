"""ASHA against the full grid on the MNIST quality benchmark: the same 8 settings (4 learning rates
x 2 EMA decays, `bench_quality_mnist`'s model and data), once with every trial trained to the end
and once under ASHA, side by side in one run on one machine.

The grid's best is its lowest final FID (small n: the scores trials report); ASHA "reaches" it at
the first of its segments (in the order they ended) whose FID is within the noise of the grid's
best (FID <= best + its std over the seed ranges). The table gives ASHA's device-seconds up to that
segment and in all, as shares of the grid's. The issue's bar: <= 50 %. Device-seconds are
reserved devices x wall seconds (`tasks.sweep.budget`), here CPU-seconds.

Sized from a quiet run (2026-12-06, 2 CPU cores): 600 steps of batch 32 a trial, scored every 200
steps on 2 seed ranges of 32 images; a segment costs ~80 s wall (~210 CPU-s) with the stages'
start-ups, so the grid's 24 segments take ~33 min and ASHA's ~17 another ~23 min: about an hour in
all. Below ~300 steps FID is no guide: it rose from step 80 to 240 (1.6 -> 9.0) while the EMA still
averaged the early model, so ASHA's rungs would rank noise; from 200 to 600 it falls in every trial.

    uv run python -m benchmarks.sweep_asha            # the measurement (~1 hour, 2 CPU cores)
    uv run python -m benchmarks.sweep_asha --quick    # smoke run, same code, 2 trials (~5 min)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import write_results
from benchmarks.bench_quality_mnist import quality_config
from tasks.evaluate.inception import resolve_extractor
from tasks.evaluate.reference import reference_features
from tasks.evaluate.stage import evaluate
from tasks.records import SegmentScore, TrialOutcome
from tasks.runtime import setup_process
from tasks.sample.stage import sample_images
from tasks.shard.stage import shard_dataset
from tasks.storage import open_store
from tasks.sweep.spec import parse_spec, plan_trials
from tasks.sweep.stage import SweepRun, TrialStages, run_sweep
from tasks.train.stage import train

STAGES = TrialStages(train=train, sample=sample_images, evaluate=evaluate)
GRID = {"train.lr": [5e-4, 1e-3, 2e-3, 4e-3], "train.ema_decay": [0.99, 0.995]}
QUICK_GRID = {"train.lr": [1e-3, 4e-3], "train.ema_decay": [0.995]}  # the smoke run's 2 trials


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 trials, few steps, tiny score sets")
    p.add_argument("--steps", type=int, help="training steps of every trial")
    p.add_argument("--segment", type=int, help="steps between two scores")
    p.add_argument("--out", default="sweep_asha.md", help="file name under benchmarks/results/")
    return p.parse_args()


def sweep(
    name: str, grid: dict[str, Any], scheduler: dict[str, Any], segment: int, work: Path, cfg: Any
) -> SweepRun:
    spec = parse_spec(
        {
            "name": name,
            "grid": grid,
            "segment_steps": segment,
            "scheduler": scheduler,
            "max_concurrent": 1,  # one trial at a time: each has the machine to itself
            "tune_storage": str(work / "tune"),
        }
    )
    plans = plan_trials(spec, cfg)
    manifest = shard_dataset(cfg.data, open_store(cfg.storage)).manifest
    return run_sweep(spec, plans, manifest, STAGES)


def _segments(outcomes: list[TrialOutcome]) -> list[SegmentScore]:
    return sorted((s for o in outcomes for s in o.trial.segments), key=lambda s: s.ended_at)


def main() -> None:
    args = parse_args()
    setup_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = args.steps or (40 if args.quick else 600)
    segment = args.segment or (20 if args.quick else 200)
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        cfg = quality_config(work, steps, 32 if args.quick else 256, 64 if args.quick else 500)
        # One trial at a time, so each stage has every core: one training rank (batch 32 a step,
        # as bench_quality_mnist trains), one sampling and one feature worker, each on all cores.
        cores = float(cfg.ray.num_cpus or 2)
        cfg = cfg.model_copy(
            update={
                "train": cfg.train.model_copy(
                    update={"checkpoint_every": segment, "workers": 1, "cpus_per_worker": cores}
                ),
                "sample": cfg.sample.model_copy(update={"cpus_per_worker": cores}),
                "evaluate": cfg.evaluate.model_copy(
                    update={
                        "metrics": ("fid",),
                        "score_images": 16 if args.quick else 32,
                        "score_repeats": 2,
                        "cpus_per_worker": cores,
                    }
                ),
            }
        )
        # The held-out split's reference statistics, cached once before either sweep: the grid's
        # first segment would otherwise pay them and flatter ASHA's share.
        store = open_store(cfg.storage)
        manifest = shard_dataset(cfg.data, store).manifest
        reference_features(store, manifest, resolve_extractor(cfg.evaluate, store), cfg.evaluate)
        t0 = time.monotonic()
        settings = QUICK_GRID if args.quick else GRID
        grid = sweep("grid", settings, {"kind": "none"}, segment, work, cfg)
        t1 = time.monotonic()
        asha = sweep(
            "asha",
            settings,
            {"kind": "asha", "grace_period": segment, "reduction_factor": 2},
            segment,
            work,
            cfg,
        )
        t2 = time.monotonic()
        finals = [o.trial.segments[-1] for o in grid.outcomes if o.status == "finished"]
        best = min(finals, key=lambda s: s.fid)
        bar = best.fid + (best.fid_std or 0.0)
        spent, reached = 0.0, None
        for s in _segments(asha.outcomes):
            spent += s.device_s
            if reached is None and s.fid <= bar:
                reached = spent
        grid_total = sum(o.trial.device_s for o in grid.outcomes)
        asha_total = sum(o.trial.device_s for o in asha.outcomes)
        rows = [
            f"| {name} | {o.trial.trial_id} | {o.trial.settings['train.lr']:g} | "
            f"{o.trial.settings['train.ema_decay']:g} | {o.trial.step} | "
            f"{o.trial.segments[-1].fid:.3f} ± {o.trial.segments[-1].fid_std or 0:.2g} | "
            f"{o.trial.device_s:.0f} | {o.status} |"
            for name, run in (("grid", grid), ("asha", asha))
            for o in run.outcomes
            if o.trial.segments
        ]
        share = "not reached" if reached is None else f"{reached / grid_total:.0%}"
        body = "\n".join(
            [
                f"{len(grid.outcomes)} trials (train.lr x train.ema_decay), {steps} steps each, scored every "
                f"{segment} steps on 2 seed ranges of {cfg.evaluate.score_images} images "
                "(stand-in InceptionV3: FIDs comparable only with each other). One trial at a "
                "time; the grid, then ASHA (grace period one segment, reduction factor 2).",
                "",
                "| sweep | trial | lr | ema_decay | steps | FID ± std (last) | CPU-s | ended |",
                "|---|---|---|---|---|---|---|---|",
                *rows,
                "",
                f"Grid: best FID {best.fid:.3f} ± {best.fid_std or 0:.2g}; {grid_total:.0f} "
                f"CPU-s in all ({t1 - t0:.0f} s wall).",
                f"ASHA: {asha_total:.0f} CPU-s in all ({asha_total / grid_total:.0%} of the "
                f"grid's; {t2 - t1:.0f} s wall); within the noise of the grid's best after "
                f"{'-' if reached is None else f'{reached:.0f}'} CPU-s: **{share} of the grid's "
                "device-seconds** (the bar: <= 50 %).",
                "",
                f"Load average (1 min): {os.getloadavg()[0]:.1f}.",
            ]
        )
        path = write_results(args.out, "Sweeps: ASHA against the full grid (MNIST)", "cpu", body)
        print(f"ASHA reached the grid's best within the noise at {share}; wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
