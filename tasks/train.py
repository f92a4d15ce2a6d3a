"""Train stage: Ray Train's TorchTrainer runs `train_loop.run_training` on every DDP rank.

This module is the thin Ray adapter. Checkpoints go to the pipeline's own object store (not Ray's
storage), so a run resumes from `runs/<run_id>/checkpoints/latest.json` whichever cluster, trainer
name or storage path runs it next.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Any

import torch

from tasks import layout
from tasks.config import PipelineConfig
from tasks.ray_runtime import ensure_ray
from tasks.records import Checkpoint, DatasetManifest, TrainResult
from tasks.storage import Store
from tasks.train_loop import TrainJob, run_training

log = logging.getLogger(__name__)


def _train_loop_per_worker(config: dict[str, Any]) -> None:  # Ray Train's train_loop_config
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
    cfg: PipelineConfig, store: Store, manifest: DatasetManifest, *, nightly: bool = False
) -> TrainResult:
    """Run (or resume) training of `train.run_id` to its target step on the dataset `manifest`."""
    tc = cfg.train
    latest = Checkpoint.latest(store, tc.run_id)
    target = target_step(cfg, latest.step if latest else 0, nightly=nightly)
    if latest is not None and latest.step >= target:
        log.info(
            "run %s is already at step %d (target %d): nothing to train",
            tc.run_id,
            latest.step,
            target,
        )
        return TrainResult(checkpoint=latest, resumed_from=latest.step, trained_steps=0, loss=None)

    store.write_json(layout.run_config(tc.run_id), cfg.model_dump(mode="json"))
    job = TrainJob(config=cfg, target_step=target, manifest=manifest)

    ensure_ray(cfg.ray)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    # Ray's own storage only holds its run metadata; our checkpoints live in the object store.
    ray_storage = tempfile.mkdtemp(prefix="diffpipe-ray-")
    try:
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"job": job},
            scaling_config=ScalingConfig(
                num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(name=f"{tc.run_id}-{target}", storage_path=ray_storage),
        )
        result = trainer.fit()
    finally:
        shutil.rmtree(ray_storage, ignore_errors=True)
    final = Checkpoint.latest(store, tc.run_id)
    if final is None or final.step != target:
        raise RuntimeError(
            f"training of run {tc.run_id} ended without a checkpoint at step {target} "
            f"(latest: {final.step if final else None})"
        )
    loss = (result.metrics or {}).get("loss")  # the last logging window's, reported at the end
    start = latest.step if latest else 0
    return TrainResult(
        checkpoint=final,
        resumed_from=latest.step if latest else None,
        trained_steps=target - start,
        loss=float(loss) if loss is not None else None,
    )
