"""The distributed evaluation: a pool of Ray actors (`tasks.evaluate.features.FeatureWorker`), each loading
the extractor once (on its own GPU with `evaluate.use_gpu`), extracts the sample shards in
parallel; the driver (`tasks.evaluate.scoring.evaluate_samples`) only adds up their moments. The stage
returns the numbers; the report renders them (`tasks.report.stage.write_evaluation_report`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tasks.config import EvalConfig, RayConfig
from tasks.evaluate.features import FeatureWorker, RepeatScores, ScoreJob, ShardFeatures, ShardJob
from tasks.evaluate.inception import ExtractorInfo, resolve_extractor
from tasks.evaluate.scoring import evaluate_samples
from tasks.jobs import pool_size
from tasks.ray_runtime import check_resources, ensure_ray, restartable
from tasks.records import DatasetManifest, Metrics, SampleSet
from tasks.storage import Store


class RayPool:
    """`evaluate.workers` FeatureWorker actors (default: as many as fit, at most `units`).

    A killed actor is restarted and its shard re-run (`max_restarts`); a shard's features and
    moments do not depend on which actor computed them."""

    def __init__(
        self,
        store: Store,
        cfg: EvalConfig,
        ray_cfg: RayConfig,
        extractor: ExtractorInfo,
        channels: int,
        units: int,
        max_restarts: int = 3,
    ) -> None:
        ensure_ray(ray_cfg)
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}
        check_resources(ray_cfg, bundle, 1, "a feature-extraction worker")
        import ray
        from ray.util import ActorPool

        worker = ray.remote(FeatureWorker).options(
            num_cpus=cfg.cpus_per_worker,
            num_gpus=1 if cfg.use_gpu else 0,
            **restartable(max_restarts),
        )
        size = pool_size(ray_cfg, bundle, cfg.workers, units)
        threads = max(1, int(cfg.cpus_per_worker))
        self.actors: list[Any] = [  # Ray actor handles
            worker.remote(store.config, cfg, extractor, channels, threads) for _ in range(size)
        ]
        self.pool = ActorPool(self.actors)

    def map_shards(self, jobs: list[ShardJob]) -> Iterator[ShardFeatures]:
        results: Iterator[ShardFeatures] = self.pool.map_unordered(
            lambda actor, job: actor.shard.remote(job), jobs
        )
        return results

    def scores(self, jobs: list[ScoreJob]) -> list[RepeatScores]:
        return list(self.pool.map(lambda actor, job: actor.scores.remote(job), jobs))

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def evaluate(
    store: Store,
    cfg: EvalConfig,
    ray_cfg: RayConfig,
    dataset: DatasetManifest,
    samples: SampleSet,
) -> Metrics:
    """Evaluate `samples` with the shards' features extracted on a pool of Ray actors; writes and
    returns their metrics."""
    return evaluate_sets(store, cfg, ray_cfg, dataset, [samples])[0]


def evaluate_sets(
    store: Store,
    cfg: EvalConfig,
    ray_cfg: RayConfig,
    dataset: DatasetManifest,
    sets: list[SampleSet],
) -> list[Metrics]:
    """Evaluate several sample sets (a sampler sweep's) on ONE pool: each actor loads the
    extractor once; the reference statistics are computed for the first set (unless cached) and
    read from the store's cache for the others. Writes and returns each set's metrics."""
    extractor = resolve_extractor(cfg, store)
    holdout = dataset.split("holdout")
    units = max(sum(len(s.shards) for s in sets), len(holdout.shards))
    pool = RayPool(store, cfg, ray_cfg, extractor, dataset.channels, units)
    try:
        return [
            evaluate_samples(store, dataset, samples, cfg, pool=pool, extractor=extractor)
            for samples in sets
        ]
    finally:
        pool.close()
