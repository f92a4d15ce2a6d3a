"""Shard stage: a dataset becomes WebDataset tars for a train and a held-out split, plus a manifest.

Layout under the storage root (the manifest is written last, so its presence means a complete set):

    datasets/<name>-<fingerprint[:12]>/train-000000.tar ...
    datasets/<name>-<fingerprint[:12]>/holdout-000000.tar ...
    datasets/<name>-<fingerprint[:12]>/manifest.json

The fingerprint covers the decoded source pixels and labels and every setting that changes the
shards, so re-running on unchanged input finds the same manifest and reuses the shards.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime

import numpy as np

from tasks import layout
from tasks.config import DataConfig
from tasks.datasets import Source, load_source
from tasks.records import DatasetManifest, RecordFormatError, ShardResult, SplitInfo
from tasks.storage import Store
from tasks.webdata import encode_png, write_shard

log = logging.getLogger(__name__)


def shard_fingerprint(source_fingerprint: str, cfg: DataConfig) -> str:
    """Identity of a shard set: the source content plus the settings that decide what goes where."""
    settings = f"{source_fingerprint}|holdout={cfg.holdout_fraction}|seed={cfg.seed}|per_shard={cfg.samples_per_shard}"
    return hashlib.sha256(settings.encode()).hexdigest()


def split_indices(n: int, holdout_fraction: float, seed: int) -> dict[layout.Split, np.ndarray]:
    """A seeded permutation cut into holdout (at least one image) and train (at least one image)."""
    if n < 2:
        raise ValueError(
            f"dataset has {n} image(s); at least 2 are needed for a train and a holdout split"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_holdout = min(max(1, round(n * holdout_fraction)), n - 1)
    return {"holdout": np.sort(order[:n_holdout]), "train": np.sort(order[n_holdout:])}


def verify_manifest(store: Store, manifest: DatasetManifest) -> list[str]:
    """Re-hash every shard; returns the keys whose sha256 differs from the manifest (empty = all good)."""
    bad = []
    for split in manifest.splits.values():
        for shard in split.shards:
            try:
                if store.sha256(shard.key) != shard.sha256:
                    bad.append(shard.key)
            except FileNotFoundError:
                bad.append(shard.key)
    return bad


def _write_split(
    store: Store, prefix: str, split: layout.Split, src: Source, idx: np.ndarray, per_shard: int
) -> SplitInfo:
    shards = []
    for n, start in enumerate(range(0, len(idx), per_shard)):
        chunk = idx[start : start + per_shard]
        samples = (
            {
                "__key__": f"{int(i):08d}",
                "png": encode_png(src.images[i].transpose(1, 2, 0)),
                "cls": int(src.labels[i]),
            }
            for i in chunk
        )
        info = write_shard(store, layout.dataset_shard(prefix, split, n), samples)
        shards.append(info)
        log.info("wrote %s (%d images)", store.url(info.key), info.count)
    return SplitInfo(count=int(len(idx)), shards=shards)


def shard_dataset(cfg: DataConfig, store: Store) -> ShardResult:
    """Shard `cfg.dataset` into `store`, or reuse an identical earlier set; the manifest is last."""
    src = load_source(cfg)
    source_fp = src.fingerprint()
    fingerprint = shard_fingerprint(source_fp, cfg)
    prefix = layout.dataset_prefix(src.name, fingerprint)
    manifest_key = layout.dataset_manifest(prefix)

    try:
        existing = DatasetManifest.read_or_none(store, manifest_key)
    except RecordFormatError as err:
        log.warning("rewriting the shard set: %s", err)
        existing = None
    if existing is not None and existing.fingerprint == fingerprint:
        # Content, not sizes: a flipped byte must not be trained on (or blamed on something else).
        damaged = verify_manifest(store, existing)
        if not damaged:
            log.info("reusing shards of %s (fingerprint %s)", store.url(prefix), fingerprint[:12])
            return ShardResult(manifest=existing, reused=True)
        log.warning(
            "%d shard(s) do not match the manifest's sha256 (%s): rewriting the set from the source",
            len(damaged),
            ", ".join(store.url(k) for k in damaged),
        )

    splits = split_indices(len(src.images), cfg.holdout_fraction, cfg.seed)
    manifest = DatasetManifest(
        dataset=src.name,
        fingerprint=fingerprint,
        source_fingerprint=source_fp,
        image_size=int(src.images.shape[-1]),
        channels=int(src.images.shape[1]),
        num_classes=len(src.class_names),
        class_names=src.class_names,
        splits={
            s: _write_split(store, prefix, s, src, splits[s], cfg.samples_per_shard)
            for s in layout.SPLITS
        },
        config=cfg,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest.write(store, manifest_key)
    log.info(
        "sharded %s: %d train / %d holdout images -> %s",
        src.name,
        manifest.split("train").count,
        manifest.split("holdout").count,
        store.url(prefix),
    )
    return ShardResult(manifest=manifest, reused=False)
