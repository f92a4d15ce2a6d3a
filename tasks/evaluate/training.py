"""The training split's pool features, for the memorization check (`tasks.evaluate.neighbours`):
the first `evaluate.max_training_images` training images (the shard stage splits by a hash of each
file, so the first shards are a fair sample), extracted once per (dataset fingerprint, extractor,
count) and cached in the store at `stats-train/<fingerprint>/<extractor sha256[:16]>-n<count>.npz`
(`tasks.layout.training_features`), as the held-out reference is (`tasks.evaluate.reference`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from tasks import layout
from tasks.config import EvalConfig
from tasks.evaluate.features import FeatureWorker, LocalPool, WorkerPool
from tasks.evaluate.inception import ExtractorInfo
from tasks.evaluate.reference import extract_split
from tasks.npz import DamagedCacheError, read_npz, write_npz
from tasks.records import DatasetManifest
from tasks.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingFeatures:
    key: str
    features: np.ndarray  # float32 [count, 2048]
    count: int


def training_features(
    store: Store,
    manifest: DatasetManifest,
    extractor: ExtractorInfo,
    cfg: EvalConfig,
    pool: WorkerPool | None = None,
) -> TrainingFeatures | None:
    """The first training images' features: from the store's cache, else extracted on `pool`
    (default this process) and cached. None when the dataset has no training split."""
    if "train" not in manifest.splits or manifest.splits["train"].count == 0:
        return None
    count = min(manifest.splits["train"].count, cfg.max_training_images)
    key = layout.training_features(manifest.fingerprint, extractor.sha256, count)
    meta: dict[str, str | int] = {
        "count": count,
        "extractor_sha256": extractor.sha256,
        "dataset_fingerprint": manifest.fingerprint,
    }
    try:
        cached = read_npz(store, key, ("features",))
        features = cached.arrays["features"]
        if all(cached.meta.get(k) == v for k, v in meta.items()) and len(features) == count:
            log.info("training features from cache %s", store.url(key))
            return TrainingFeatures(key, features, count)
        log.warning("training features %s do not match %s; recomputing", store.url(key), meta)
    except FileNotFoundError:
        pass
    except DamagedCacheError as err:
        log.warning("%s; extracting the training features again", err)
    pool = pool or LocalPool(FeatureWorker(store.config, cfg, extractor, manifest.channels))
    features = extract_split(store, manifest, count, pool, split="train")
    meta |= {"extractor_label": extractor.label, "created": datetime.now(UTC).isoformat()}
    write_npz(store, key, {"features": features}, meta)
    log.info("features of %d training images written to %s", count, store.url(key))
    return TrainingFeatures(key, features, count)
