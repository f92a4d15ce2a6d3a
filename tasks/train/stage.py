"""Train stage: Ray Train's TorchTrainer runs `tasks.train.loop.run_training` on every DDP rank.

This module is the thin Ray adapter. Checkpoints go to the pipeline's own object store (not Ray's
storage), so a run resumes from `runs/<run_id>/checkpoints/latest.json` whichever cluster, trainer
name or storage path runs it next. The stage reads `latest.json` once, in the driver; the ranks
learn the newest checkpoint from the driver's `RunState` actor.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from tasks import layout
from tasks.config import ConfigError, PipelineConfig
from tasks.ray_runtime import check_resources, ensure_ray, on_driver_node
from tasks.records import Checkpoint, DatasetManifest, LogWindow, RecordFormatError, TrainResult
from tasks.runtime import temp_prefix
from tasks.storage import StorageError, StorageUnavailableError, Store
from tasks.train.loop import (
    DivergedError,
    TrainJob,
    check_resume_compatible,
    run_training,
    unet_config_for,
)
from tasks.train.phema import storage_cost
from tasks.usage import reported
from tasks.webdata import ShardReadError

log = logging.getLogger(__name__)

# Errors a restarted worker group would only meet again (damaged shards or checkpoints, a diverged
# run, a bad setting, a store without the bucket or missing or refusing a node's credentials): the
# first one ends the run. Ray Train restarts the group after any worker error
# (`train.max_failures`), so the failing rank leaves the error with the driver first, and the
# restarted workers find it there and return at once. A store that stayed unreachable for its whole
# retry budget (StorageUnavailableError) is the exception: an outage ends, so that one is retried.
NOT_RETRIED: tuple[type[BaseException], ...] = (
    RecordFormatError,
    ShardReadError,
    DivergedError,
    ConfigError,
    StorageError,
)


class RunState:
    """What the ranks of one train stage share with its driver (a Ray actor on the driver's node):
    the run's newest checkpoint, first the driver's one read of `latest.json`, then each checkpoint
    rank 0 saves, so a restarted worker group resumes from it without reading the store; and the
    error that ends the run, once a rank met one that a restart would only meet again."""

    def __init__(self, newest: Checkpoint | None) -> None:
        self._newest = newest
        self._error: BaseException | None = None

    def newest(self) -> Checkpoint | None:
        return self._newest

    def saved(self, checkpoint: Checkpoint) -> None:
        self._newest = checkpoint

    def give_up(self, error: BaseException) -> None:
        self._error = self._error or error  # the first one is the cause

    def error(self) -> BaseException | None:
        return self._error


@reported
def _train_loop_per_worker(config: dict[str, Any]) -> None:  # Ray Train's train_loop_config
    import ray
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    progress = config["progress"]  # a ray.util.queue.Queue read by the driver
    run = config["run"]  # the driver's RunState actor
    if ray.get(run.error.remote()) is not None:  # a rank before this restart gave up
        return

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True)
    logging.getLogger("ray").setLevel(logging.WARNING)  # its per-report INFO lines are noise
    runtime = ray.get_runtime_context()
    progress.put(
        {
            "placement": {
                "rank": rank,
                "node_id": runtime.get_node_id(),
                "ip": ray.util.get_node_ip_address(),
            }
        }
    )
    device = ray.train.torch.get_device()
    try:
        run_training(
            job,
            rank=rank,
            world_size=world,
            device=device,
            wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
            report=lambda metrics: _report(metrics, rank, progress),
            newest=lambda: ray.get(run.newest.remote()),
            saved=lambda checkpoint: _saved(checkpoint, run, progress),
            # Ray Train's PreemptionWatcher marks every rank when a node of the group is drained
            # for preemption; this call agrees on rank 0's answer (a barrier of all ranks).
            draining=lambda: ray.train.get_preemption_info() is not None,
        )
    except NOT_RETRIED as err:
        if not isinstance(err, StorageUnavailableError):
            ray.get(run.give_up.remote(err))
        raise


def _saved(checkpoint: Checkpoint, run: Any, progress: Any) -> None:
    """Rank 0 saved `checkpoint`: the run's state keeps it (a restarted group resumes from it)
    and the driver hears of it (it may score it while training goes on)."""
    import ray

    ray.get(run.saved.remote(checkpoint))
    progress.put({"checkpoint": checkpoint.model_dump(mode="json")})


def _report(metrics: dict[str, float], rank: int, progress: Any) -> None:
    """Every rank reports to Ray Train; rank 0 also tells the driver, which shows the progress."""
    import ray.train

    ray.train.report(metrics)
    if rank == 0:
        progress.put({"window": metrics})


def _run_with_progress(
    fit: Callable[[], Any],
    progress: Any,
    target: int,
    per_step: int,
    on_checkpoint: Callable[[Checkpoint, bool], None] | None = None,
) -> Any:
    """Run `fit` (blocking) in a thread; meanwhile log what the workers send: where each rank runs,
    and rank 0's step, loss, images/s, data wait and the time left; pass each checkpoint rank 0
    saves to `on_checkpoint`, with whether it is the last (of step `target`)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-train-fit") as pool:
        running = pool.submit(fit)
        while not running.done() or not progress.empty():
            try:
                message = progress.get(timeout=1.0)
            except Exception:  # noqa: BLE001 - ray.util.queue.Empty: nothing new this second
                continue
            if "placement" in message:
                p = message["placement"]
                log.info("rank %d runs on node %s (%s)", p["rank"], p["node_id"], p["ip"])
                continue
            if "checkpoint" in message:
                if on_checkpoint is not None:
                    saved = Checkpoint.model_validate(message["checkpoint"])
                    on_checkpoint(saved, saved.step == target)
                continue
            m = LogWindow.model_validate(message["window"])
            steps_per_s = m.images_per_s / per_step
            eta = (target - m.step) / steps_per_s if steps_per_s > 0 else float("nan")
            log.info(
                "step %d/%d  loss %.4f  %.0f img/s  data wait %.0f%%  ETA %s",
                m.step,
                target,
                m.loss,
                m.images_per_s,
                100 * m.data_wait,
                _duration(eta),
            )
        return running.result()  # re-raises fit's error here


def _duration(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def target_step(cfg: PipelineConfig, done: int, *, nightly: bool) -> int:
    """Where this run stops: `train.steps`, or for a nightly run with `steps_per_night`, that much
    past `done`, the step of the latest checkpoint."""
    if nightly and cfg.train.steps_per_night:
        return max(cfg.train.steps, done + cfg.train.steps_per_night)
    return cfg.train.steps


def night_target(store: Store, cfg: PipelineConfig, done: int, night: str) -> int:
    """The step night `night` trains to: fixed (with the step it started from) the first time the
    night trains, so that a rerun of a night killed during or after its training stops where the
    night would have, instead of training `steps_per_night` further."""
    key = layout.nightly_train_target(layout.nightly_prefix(cfg.train.run_id, night))
    if store.exists(key):
        return int(store.read_json(key)["target_step"])
    target = target_step(cfg, done, nightly=True)
    store.write_json(key, {"night": night, "start_step": done, "target_step": target})
    return target


def train(
    cfg: PipelineConfig,
    store: Store,
    manifest: DatasetManifest,
    *,
    nightly: bool = False,
    night: str | None = None,
    on_checkpoint: Callable[[Checkpoint, bool], None] | None = None,
) -> TrainResult:
    """Run (or resume) training of `train.run_id` to its target step on the dataset `manifest`.

    `on_checkpoint` is called in this process with each checkpoint as soon as it is saved (and
    whether it is the last), while training goes on (the caller scores checkpoints with it: `evaluate.score_every`)."""
    tc = cfg.train
    latest = Checkpoint.latest(store, tc.run_id)
    if latest is not None:  # before anything is written, the run's config.json included
        check_resume_compatible(latest, cfg.model, unet_config_for(cfg.model, manifest))
    done = latest.step if latest else 0
    if nightly and night is not None:  # a rerun of the night trains to the night's own target
        target = night_target(store, cfg, done, night)
    else:
        target = target_step(cfg, done, nightly=nightly)
    if latest is not None and latest.step >= target:
        log.info(
            "run %s is already at step %d (target %d): nothing to train",
            tc.run_id,
            latest.step,
            target,
        )
        return TrainResult(checkpoint=latest, resumed_from=latest.step, trained_steps=0, loss=None)

    if latest is not None:
        log.info("resuming run %s from step %d to %d", tc.run_id, latest.step, target)
    if tc.phema_sigma_rels:
        unet = unet_config_for(cfg.model, manifest)
        log.info("%s", storage_cost(tc, unet, latest.step if latest else 0, target))
    store.write_json(layout.run_config(tc.run_id), cfg.model_dump(mode="json"))
    job = TrainJob(config=cfg, target_step=target, manifest=manifest, temp_prefix=temp_prefix())

    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    ensure_ray(cfg.ray)
    check_resources(
        cfg.ray,
        resources,
        tc.workers,
        f"training (train.workers={tc.workers})",
        one_per_node=tc.placement_strategy == "STRICT_SPREAD",
    )
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # ray.train's own FailureConfig, whose preemption fields type checkers miss: ray.train picks
    # it (Ray Train v2's) at import time.
    from ray.train.v2.api.config import FailureConfig
    from ray.util.queue import Queue

    # On the driver's node: losing a worker node must not take these actors with it.
    progress = Queue(actor_options={"num_cpus": 0, **on_driver_node()})
    run: Any = ray.remote(RunState).options(num_cpus=0, **on_driver_node()).remote(latest)
    # Ray's own storage only holds its run metadata; our checkpoints live in the object store.
    ray_storage = tempfile.mkdtemp(prefix=temp_prefix() + "ray-")
    try:
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"job": job, "progress": progress, "run": run},
            scaling_config=ScalingConfig(
                num_workers=tc.workers,
                use_gpu=tc.use_gpu,
                resources_per_worker=resources,
                placement_strategy=tc.placement_strategy,
            ),
            # A restarted worker group resumes from the newest checkpoint `run` knows of.
            run_config=RunConfig(
                name=f"{tc.run_id}-{target}",
                storage_path=ray_storage,
                # A drained node's loss is a preemption: counted apart from max_failures.
                failure_config=FailureConfig(
                    max_failures=tc.max_failures, max_preemption_failures=tc.max_preemptions
                ),
            ),
        )
        result = _run_with_progress(
            trainer.fit, progress, target, tc.batch_size * tc.workers, on_checkpoint
        )
        error = ray.get(run.error.remote())
        if error is not None:  # the restarted workers returned at once: the run failed
            raise error
        final = ray.get(run.newest.remote())  # the last checkpoint rank 0 saved
    finally:
        shutil.rmtree(ray_storage, ignore_errors=True)
        progress.shutdown()
        ray.kill(run)
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
