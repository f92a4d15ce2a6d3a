"""Shard stage against the S3-compatible test server and local directories."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.config import DataConfig, StorageConfig
from tasks.records import DatasetManifest
from tasks.shard import shard_dataset, verify_manifest
from tasks.storage import Store
from tasks.webdata import read_images


def test_digits_to_s3_checksums_splits_and_reuse(s3_storage):
    store = Store(s3_storage)
    cfg = DataConfig(samples_per_shard=200)
    result = shard_dataset(cfg, store)
    first = result.manifest
    assert not result.reused
    train, holdout = first.split("train"), first.split("holdout")
    assert train.count + holdout.count == 1797 and holdout.count == 180
    assert [s.count for s in train.shards] == [200] * 8 + [17]
    assert first.image_size == 8 and first.channels == 1 and first.num_classes == 10
    assert verify_manifest(store, first) == []
    # what is stored is the record the stage returned
    assert DatasetManifest.read(store, first.key) == first

    images, labels = read_images(store, [s.key for s in holdout.shards], channels=1)
    assert (
        images.shape == (180, 1, 8, 8)
        and images.dtype == np.uint8
        and set(labels) <= set(range(10))
    )

    stamps = {s.key: store.fs.info(store.path(s.key))["LastModified"] for s in train.shards}
    again = shard_dataset(cfg, store)
    assert again.reused and again.manifest == first
    assert stamps == {k: store.fs.info(store.path(k))["LastModified"] for k in stamps}

    other = shard_dataset(DataConfig(samples_per_shard=200, holdout_fraction=0.2), store)
    assert other.manifest.fingerprint != first.fingerprint and not other.reused


def test_tampered_shard_is_detected_and_rewritten(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    cfg = DataConfig(max_images=100, samples_per_shard=50)
    m = shard_dataset(cfg, store).manifest
    victim = m.split("train").shards[0].key
    store.write_bytes(victim, b"truncated")
    assert verify_manifest(store, m) == [victim]
    again = shard_dataset(cfg, store)  # size mismatch: the set is rewritten, not reused
    assert not again.reused and verify_manifest(store, again.manifest) == []


def test_mnist_from_shared_data(mnist_root, tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    m = shard_dataset(
        DataConfig(dataset="mnist", root=str(mnist_root), source_split="test", max_images=1000),
        store,
    ).manifest
    assert m.image_size == 28 and m.split("train").count == 900
    images, _ = read_images(store, [s.key for s in m.split("holdout").shards], channels=1)
    assert 20 < images.mean() < 50  # MNIST's mean pixel is 33.8


def test_imagefolder_and_its_errors(tmp_path):
    root = tmp_path / "my imgs#1"
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    m = shard_dataset(
        DataConfig(dataset=f"imagefolder:{root}", image_size=8, holdout_fraction=0.25), store
    ).manifest
    assert m.class_names == ["cats", "dogs"] and m.channels == 3 and m.image_size == 8
    assert m.split("holdout").count == 3
    # the folder's name becomes a key-safe dataset name
    assert m.dataset == "imagefolder-my-imgs-1" and m.key.startswith(
        "datasets/imagefolder-my-imgs-1-"
    )

    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        shard_dataset(DataConfig(dataset=f"imagefolder:{root}"), store)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        shard_dataset(DataConfig(dataset=f"imagefolder:{tmp_path / 'missing'}"), store)


def test_mnist_without_files_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        shard_dataset(
            DataConfig(dataset="mnist", root=str(tmp_path)),
            Store(StorageConfig(root=str(tmp_path / "s"))),
        )
