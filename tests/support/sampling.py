"""Sampling one seed range in the test process, as an actor of `tasks.sample.stage.sample_images`
does for each of its ranges: the tests compare its shards with the actor pool's."""

from __future__ import annotations

from tasks.config import SampleConfig, StorageConfig
from tasks.records import Checkpoint, SampleShard
from tasks.sample.generate import SeedRangeSampler, completed
from tasks.storage import open_store


def sample_seed_range(
    storage: StorageConfig,
    checkpoint: Checkpoint,
    weights_key: str,
    cfg: SampleConfig,
    seed_start: int,
    seed_stop: int,
    shard_key: str,
    receipt_key: str,
) -> tuple[SampleShard, bool]:
    """Seeds [seed_start, seed_stop) into `shard_key` and its receipt; (receipt, reused). A range
    that is done is returned without loading the weights."""
    done = completed(open_store(storage), shard_key, receipt_key)
    if done is not None:
        return done, True
    sampler = SeedRangeSampler(storage, checkpoint, weights_key, cfg)
    return sampler.run(seed_start, seed_stop, shard_key, receipt_key)
