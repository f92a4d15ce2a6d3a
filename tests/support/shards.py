"""Checking a shard set against its manifest, as the shard stage's tests do after a run."""

from __future__ import annotations

from tasks.records import DatasetManifest
from tasks.storage import Store


def verify_manifest(store: Store, manifest: DatasetManifest) -> list[str]:
    """Re-hash every shard; returns the keys whose sha256 differs from the manifest (empty = all
    good): missing shards count as differing."""
    bad = []
    for split in manifest.splits.values():
        for shard in split.shards:
            try:
                if store.sha256(shard.key) != shard.sha256:
                    bad.append(shard.key)
            except FileNotFoundError:
                bad.append(shard.key)
    return bad
