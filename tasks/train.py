"""Train stage: Ray Train's TorchTrainer runs `train_loop.run_training` on every DDP rank.

This module is the thin Ray adapter. Checkpoints go to the pipeline's own object store (not Ray's
storage), so a run resumes from `runs/<run_id>/checkpoints/latest.json` whichever cluster, trainer
name or storage path runs it next.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import torch

from tasks.config import PipelineConfig
from tasks.ray_runtime import ensure_ray
from tasks.storage import Store
from tasks.train_loop import TrainJob, read_latest, run_prefix, run_training

log = logging.getLogger(__name__)


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    job: TrainJob = config["job"]
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True)
    device = ray.train.torch.get_device()
    run_training(
        job,
        rank=rank,
        world_size=world,
        device=device,
        wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
        report=lambda metrics: ray.train.report(metrics),
    )


def target_step(cfg: PipelineConfig, done: int, *, nightly: bool) -> int:
    """Where this run stops: `train.steps`, or for a nightly run with `steps_per_night`, that much
    past `done`, the step of the latest checkpoint."""
    if nightly and cfg.train.steps_per_night:
        return max(cfg.train.steps, done + cfg.train.steps_per_night)
    return cfg.train.steps


def train(
    cfg: PipelineConfig, manifest: dict[str, Any], *, nightly: bool = False
) -> dict[str, Any]:
    """Run (or resume) training to the target step; returns {"run_id", "step", "checkpoint_key", "resumed_from", ...}."""
    store = Store(cfg.storage)
    latest = read_latest(store, cfg.train.run_id)
    target = target_step(cfg, latest["step"] if latest else 0, nightly=nightly)
    if latest is not None and latest["step"] >= target:
        log.info(
            "run %s is already at step %d (target %d): nothing to train",
            cfg.train.run_id,
            latest["step"],
            target,
        )
        return {
            "run_id": cfg.train.run_id,
            "step": latest["step"],
            "checkpoint_key": latest["key"],
            "resumed_from": latest["step"],
            "trained_steps": 0,
        }

    store.write_json(f"{run_prefix(cfg.train.run_id)}/config.json", cfg.model_dump(mode="json"))
    job = TrainJob(
        config=cfg,
        storage=store.config,
        target_step=target,
        manifest={k: v for k, v in manifest.items() if k != "reused"},
    )

    ensure_ray(cfg.ray)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        # Ray's own storage only holds its run metadata; our checkpoints live in the object store.
        run_config=RunConfig(
            name=f"{tc.run_id}-{target}", storage_path=tempfile.mkdtemp(prefix="diffpipe-ray-")
        ),
    )
    result = trainer.fit()
    final = read_latest(store, tc.run_id)
    if final is None or final["step"] != target:
        raise RuntimeError(
            f"training of run {tc.run_id} ended without a checkpoint at step {target} (latest: {final})"
        )
    start = latest["step"] if latest else 0
    return {
        "run_id": tc.run_id,
        "step": target,
        "checkpoint_key": final["key"],
        "resumed_from": latest["step"] if latest else None,
        "trained_steps": target - start,
        "metrics": dict(result.metrics or {}),
    }
