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
from typing import Any

import numpy as np

from tasks.config import DataConfig
from tasks.datasets import Source, load_source
from tasks.storage import Store
from tasks.webdata import encode_png, write_shard

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "diffusion-pipeline/dataset@1"
SPLITS = ("train", "holdout")


def shard_fingerprint(source_fingerprint: str, cfg: DataConfig) -> str:
    """Identity of a shard set: the source content plus the settings that decide what goes where."""
    settings = f"{source_fingerprint}|holdout={cfg.holdout_fraction}|seed={cfg.seed}|per_shard={cfg.samples_per_shard}"
    return hashlib.sha256(settings.encode()).hexdigest()


def split_indices(n: int, holdout_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A seeded permutation cut into holdout (at least one image) and train (at least one image)."""
    if n < 2:
        raise ValueError(
            f"dataset has {n} image(s); at least 2 are needed for a train and a holdout split"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_holdout = min(max(1, round(n * holdout_fraction)), n - 1)
    return {"holdout": np.sort(order[:n_holdout]), "train": np.sort(order[n_holdout:])}


def _manifest_is_complete(store: Store, manifest: dict[str, Any]) -> bool:
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            try:
                size = store.fs.info(store.path(shard["key"]))["size"]
            except FileNotFoundError:
                return False
            if size != shard["bytes"]:
                return False
    return True


def verify_manifest(store: Store, manifest: dict[str, Any]) -> list[str]:
    """Re-hash every shard; returns the keys whose sha256 differs from the manifest (empty = all good)."""
    bad = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if not store.exists(shard["key"]) or store.sha256(shard["key"]) != shard["sha256"]:
                bad.append(shard["key"])
    return bad


def _write_split(
    store: Store, prefix: str, split: str, src: Source, idx: np.ndarray, per_shard: int
) -> dict[str, Any]:
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
        info = write_shard(store, f"{prefix}/{split}-{n:06d}.tar", samples)
        shards.append(info.to_dict())
        log.info("wrote %s (%d images)", store.url(info.key), info.count)
    return {"count": int(len(idx)), "shards": shards}


def shard_dataset(cfg: DataConfig, store: Store) -> dict[str, Any]:
    """Shard `cfg.dataset` into `store` (or reuse an identical earlier run); returns the manifest.

    The returned dict also carries `manifest_key` and `reused` (not stored).
    """
    src = load_source(cfg)
    source_fp = src.fingerprint()
    fingerprint = shard_fingerprint(source_fp, cfg)
    prefix = f"datasets/{src.name}-{fingerprint[:12]}"
    manifest_key = f"{prefix}/manifest.json"

    existing = store.read_json_or_none(manifest_key)
    if (
        existing
        and existing.get("fingerprint") == fingerprint
        and _manifest_is_complete(store, existing)
    ):
        log.info("reusing shards of %s (fingerprint %s)", store.url(prefix), fingerprint[:12])
        return {**existing, "manifest_key": manifest_key, "reused": True}

    splits = split_indices(len(src.images), cfg.holdout_fraction, cfg.seed)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "dataset": src.name,
        "fingerprint": fingerprint,
        "source_fingerprint": source_fp,
        "image_size": int(src.images.shape[-1]),
        "channels": int(src.images.shape[1]),
        "num_classes": len(src.class_names),
        "class_names": src.class_names,
        "splits": {
            s: _write_split(store, prefix, s, src, splits[s], cfg.samples_per_shard) for s in SPLITS
        },
        "config": cfg.model_dump(mode="json"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.write_json(manifest_key, manifest)
    log.info(
        "sharded %s: %d train / %d holdout images -> %s",
        src.name,
        manifest["splits"]["train"]["count"],
        manifest["splits"]["holdout"]["count"],
        store.url(prefix),
    )
    return {**manifest, "manifest_key": manifest_key, "reused": False}


def load_manifest(store: Store, manifest_key: str) -> dict[str, Any]:
    manifest = store.read_json(manifest_key)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{store.url(manifest_key)} is not a dataset manifest (format {manifest.get('format')!r})"
        )
    return {**manifest, "manifest_key": manifest_key}
