"""The reference statistics: pool features of the held-out split and their moments, computed once
per (dataset fingerprint, extractor, count) and cached in the store at
`stats/<fingerprint>/<extractor sha256[:16]>-n<count>.npz` (`tasks.layout.reference_stats`).

A cached object of other inputs (its meta does not match), or one whose bytes are damaged, is
computed again and overwritten, with a warning naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from diffusion_core.fid import feature_moments
from tasks import layout
from tasks.config import EvalConfig
from tasks.evaluate.features import FeatureWorker, LocalPool, ShardJob, WorkerPool
from tasks.evaluate.inception import ExtractorInfo
from tasks.jobs import Progress
from tasks.npz import DamagedCacheError, read_npz, write_npz
from tasks.records import DatasetManifest
from tasks.storage import Store

log = logging.getLogger(__name__)


_NAMES: dict[layout.Split, str] = {"holdout": "held-out", "train": "training"}


@dataclass(frozen=True)
class ReferenceStats:
    """Pool features of the held-out split and their moments, as cached in the store."""

    key: str
    features: np.ndarray  # float32 [N, 2048], as stored
    mu: np.ndarray  # float64 [2048]
    sigma: np.ndarray  # float64 [2048, 2048]
    count: int
    computed: bool  # False when read from the cache


def reference_features(
    store: Store,
    manifest: DatasetManifest,
    extractor: ExtractorInfo,
    cfg: EvalConfig,
    pool: WorkerPool | None = None,
) -> ReferenceStats:
    """The held-out split's features and moments: from the store's cache, else extracted (the
    shards in parallel on `pool`, default this process) and cached."""
    holdout = manifest.split("holdout")
    count = (
        holdout.count
        if cfg.max_reference_images is None
        else min(holdout.count, cfg.max_reference_images)
    )
    key = layout.reference_stats(manifest.fingerprint, extractor.sha256, count)
    meta: dict[str, str | int] = {
        "count": count,
        "extractor_sha256": extractor.sha256,
        "dataset_fingerprint": manifest.fingerprint,
    }
    cached = _cached(store, key, meta)
    if cached is not None:
        log.info("reference stats from cache %s", store.url(key))
        return cached

    pool = pool or LocalPool(FeatureWorker(store.config, cfg, extractor, manifest.channels))
    features = extract_split(store, manifest, count, pool)
    mu, sigma = feature_moments(features)
    meta |= {
        "extractor_label": extractor.label,
        "dataset": manifest.dataset,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_npz(store, key, {"features": features, "mu": mu, "sigma": sigma}, meta)
    log.info("reference stats of %d held-out images written to %s", count, store.url(key))
    return ReferenceStats(key, features, mu, sigma, count, computed=True)


def _cached(store: Store, key: str, expected: dict[str, str | int]) -> ReferenceStats | None:
    """The cached statistics when they are there, read back whole and were made from `expected`."""
    try:
        cached = read_npz(store, key, ("features", "mu", "sigma"))
    except FileNotFoundError:
        return None
    except DamagedCacheError as err:
        log.warning("%s; computing the reference stats again", err)
        return None
    features = cached.arrays["features"]
    meta = cached.meta
    if any(meta.get(k) != v for k, v in expected.items()) or len(features) != expected["count"]:
        log.warning("reference stats %s do not match %s; recomputing", store.url(key), expected)
        return None
    mu, sigma = cached.arrays["mu"], cached.arrays["sigma"]
    return ReferenceStats(key, features, mu, sigma, int(str(meta["count"])), computed=False)


def extract_split(
    store: Store,
    manifest: DatasetManifest,
    count: int,
    pool: WorkerPool,
    split: layout.Split = "holdout",
) -> np.ndarray:
    """float32 [count, 2048]: the pool features of the first `count` images of `split`."""
    jobs: list[ShardJob] = []
    left = count
    for shard in manifest.split(split).shards:
        if left <= 0:
            break
        take = min(shard.count, left)
        jobs.append(ShardJob(len(jobs), shard.key, take, shard.sha256, features_key=None))
        left -= take
    if left > 0:
        raise ValueError(
            f"the {_NAMES[split]} shards of {store.url(manifest.key)} hold {count - left} images, "
            f"the manifest promises {count}; rerun the shard stage"
        )
    progress = Progress(f"{'reference' if split == 'holdout' else split} features", count)
    parts: dict[int, np.ndarray] = {}
    for result in pool.map_shards(jobs):
        assert result.features is not None
        parts[result.index] = result.features
        progress.update(result.count)
    return np.concatenate([parts[n] for n in range(len(jobs))]).astype(np.float32)
