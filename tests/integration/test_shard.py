"""Shard stage against the S3-compatible test server and local directories."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import DataConfig, StorageConfig
from tasks.records import DatasetManifest
from tasks.shard.chunks import split_of
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.webdata import iter_raw_samples, read_images
from tests.support.imagefolders import make_folder
from tests.support.shards import verify_manifest


def test_digits_to_s3_checksums_splits_and_reuse(s3_storage):
    store = Store(s3_storage)
    cfg = DataConfig(samples_per_shard=200)
    result = shard_dataset(cfg, store)
    first = result.manifest
    assert not result.reused and result.written == len(first.split("train").shards) + len(
        first.split("holdout").shards
    )
    train, holdout = first.split("train"), first.split("holdout")
    assert train.count + holdout.count == 1797 and 150 <= holdout.count <= 210
    # content-defined shard sizes: between half and 4x samples_per_shard (a split's last: fewer)
    assert all(100 <= s.count <= 800 for s in train.shards[:-1]) and 6 <= len(train.shards) <= 12
    assert first.image_size == 8 and first.channels == 1 and first.num_classes == 10
    assert verify_manifest(store, first) == []
    # what is stored is the record the stage returned
    assert DatasetManifest.read(store, first.key) == first

    images, labels = read_images(store, [s.key for s in holdout.shards], channels=1)
    assert (
        images.shape == (holdout.count, 1, 8, 8)
        and images.dtype == np.uint8
        and set(labels) <= set(range(10))
    )
    # an image's split is a function of its own key
    keys = [s["__key__"] for s in iter_raw_samples(store, [s.key for s in holdout.shards])]
    assert all(split_of(k, 0.1, 0) == "holdout" for k in keys)

    stamps = {s.key: store.fs.info(store.path(s.key))["LastModified"] for s in train.shards}
    again = shard_dataset(cfg, store)
    assert again.reused and again.manifest == first and again.written == 0
    assert stamps == {k: store.fs.info(store.path(k))["LastModified"] for k in stamps}

    other = shard_dataset(DataConfig(samples_per_shard=200, holdout_fraction=0.2), store)
    assert other.manifest.fingerprint != first.fingerprint and not other.reused
    assert other.manifest.prefix != first.prefix


def test_tampered_shard_is_detected_and_rewritten(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    cfg = DataConfig(max_images=100, samples_per_shard=50)
    m = shard_dataset(cfg, store).manifest
    victim = m.split("train").shards[0].key
    store.write_bytes(victim, b"truncated")
    assert verify_manifest(store, m) == [victim]
    again = shard_dataset(cfg, store)  # the damaged shard is rewritten, the others kept
    assert not again.reused and verify_manifest(store, again.manifest) == []
    assert (
        again.written == 1
        and again.kept == len(m.split("train").shards) + len(m.split("holdout").shards) - 1
    )
    assert again.manifest.fingerprint == m.fingerprint


def test_mnist_from_shared_data(mnist_root, tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    m = shard_dataset(
        DataConfig(dataset="mnist", root=str(mnist_root), source_split="test", max_images=1000),
        store,
    ).manifest
    assert m.image_size == 28 and m.split("train").count + m.split("holdout").count == 1000
    assert 70 <= m.split("holdout").count <= 130
    images, _ = read_images(store, [s.key for s in m.split("holdout").shards], channels=1)
    assert 20 < images.mean() < 50  # MNIST's mean pixel is 33.8


def test_imagefolder_and_its_errors(tmp_path):
    root = tmp_path / "my imgs#1"
    make_folder(root, 6, size=12)
    (root / "cats" / "notes.txt").write_text("not an image: ignored")
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    cfg = DataConfig(dataset=f"imagefolder:{root}", image_size=8, holdout_fraction=0.3, workers=0)
    m = shard_dataset(cfg, store).manifest
    assert m.class_names == ["cats", "dogs"] and m.channels == 3 and m.image_size == 8
    assert m.split("holdout").count == sum(
        split_of(f"{c}/{i:04d}.png", 0.3, 0) == "holdout"
        for c in ("cats", "dogs")
        for i in range(6)
    )
    assert m.source == str(root) and m.skipped == []
    # the folder's name becomes a key-safe dataset name; sample keys are the files' paths
    assert m.dataset == "imagefolder-my-imgs-1" and m.key.startswith(
        "datasets/imagefolder-my-imgs-1-"
    )
    samples = list(iter_raw_samples(store, [s.key for s in m.split("train").shards]))
    assert {s["__key__"] for s in samples} <= {
        f"{c}/{i:04d}%2Epng" for c in ("cats", "dogs") for i in range(6)
    }
    assert {int(s["cls"]) for s in samples} == {0, 1}

    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(
        ValueError, match=r"image .*dogs/broken\.png cannot be decoded.*on_bad_file"
    ):
        shard_dataset(cfg, store)
    skip = shard_dataset(cfg.model_copy(update={"on_bad_file": "skip"}), store)
    assert [(s.path, s.reason.split(" (")[0]) for s in skip.manifest.skipped] == [
        ("dogs/broken.png", "cannot be decoded")
    ]
    assert skip.written == 1 and skip.kept >= 1  # only the chunk the file fell into
    with pytest.raises(FileNotFoundError, match="not a directory"):
        shard_dataset(DataConfig(dataset=f"imagefolder:{tmp_path / 'missing'}"), store)


def test_mnist_without_files_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        shard_dataset(
            DataConfig(dataset="mnist", root=str(tmp_path)),
            Store(StorageConfig(root=str(tmp_path / "s"))),
        )


def test_progress_lines_carry_the_count_of_the_listing(tmp_path, monkeypatch, caplog):
    """A job that outlasts half a progress interval counts its listing beside the work, so its
    progress lines say how far along it is; a shorter one never lists twice."""
    import logging
    import threading

    import tasks.shard.stage

    make_folder(tmp_path / "src", per_class=40, size=8)
    cfg = DataConfig(dataset=f"imagefolder:{tmp_path / 'src'}", samples_per_shard=4, workers=0)
    monkeypatch.setattr(
        tasks.shard.stage, "PROGRESS_EVERY_S", 0.0
    )  # a line per chunk, count at once
    with caplog.at_level(logging.INFO, logger="tasks.jobs"):
        shard_dataset(cfg, Store(StorageConfig(root=str(tmp_path / "store"))))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("shard: ")]
    assert len(lines) >= 5, lines
    assert lines[-1].startswith("shard: 80/80 images (100%)"), lines[-1]

    timers: list[threading.Timer] = []
    start = threading.Timer.start
    monkeypatch.setattr(tasks.shard.stage, "PROGRESS_EVERY_S", 3600.0)
    monkeypatch.setattr(threading.Timer, "start", lambda t: (timers.append(t), start(t))[1])
    shard_dataset(cfg, Store(StorageConfig(root=str(tmp_path / "store2"))))
    assert len(timers) == 1
    assert timers[0].finished.is_set()  # cancelled when the listing ended: it never counts
