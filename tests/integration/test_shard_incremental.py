"""The shard stage on a growing image folder: stable splits, only new or changed chunks written,
the same shards as a fresh run; empty classes, bad files and listing files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tasks.config import DataConfig, StorageConfig
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.webdata import iter_raw_samples
from tests.support.imagefolders import make_folder, write_png
from tests.support.shards import verify_manifest


def _splits(store, manifest):
    """{sample key: split} of every image in the manifest's shards."""
    return {
        s["__key__"]: split
        for split, info in manifest.splits.items()
        for s in iter_raw_samples(store, [sh.key for sh in info.shards])
    }


def _shards(manifest):
    return {
        split: [(s.key, s.sha256) for s in info.shards] for split, info in manifest.splits.items()
    }


def test_a_grown_folder_rewrites_only_the_chunks_it_changed(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, 150, classes=("a", "b"))
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    cfg = DataConfig(dataset=f"imagefolder:{root}", samples_per_shard=16, workers=0)
    first = shard_dataset(cfg, store)
    n_first = first.written
    assert n_first >= 12 and first.kept == 0
    before = _splits(store, first.manifest)

    # a night's growth: new files at the end of one class and in the middle of the other,
    # and one changed file
    rng = np.random.default_rng(7)
    for name in ("a/0150.png", "a/0151.png", "b/0042x.png"):
        write_png(root / name, rng)
    changed = root / "a" / "0010.png"
    write_png(changed, rng)
    os.utime(changed, ns=(1, 1))
    grown = shard_dataset(cfg, store)
    assert not grown.reused
    assert 1 <= grown.written <= 6 and grown.kept >= n_first - 4, (grown.written, grown.kept)
    after = _splits(store, grown.manifest)
    assert len(after) == 303
    assert all(after[k] == split for k, split in before.items())  # no image changed split
    assert verify_manifest(store, grown.manifest) == []

    # the same shards, byte for byte, as a fresh run on the grown folder
    fresh = shard_dataset(cfg, Store(StorageConfig(root=str(tmp_path / "fresh"))))
    assert _shards(fresh.manifest) == _shards(grown.manifest)
    assert fresh.manifest.fingerprint == grown.manifest.fingerprint

    again = shard_dataset(cfg, store)
    assert again.reused and again.manifest == grown.manifest


def test_empty_classes_are_refused_or_skipped_never_a_class(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, 4, classes=("a", "c"))
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here")
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    cfg = DataConfig(dataset=f"imagefolder:{root}", holdout_fraction=0.4, workers=0)
    with pytest.raises(ValueError, match="class folder 'b' holds no images.*on_empty_class=skip"):
        shard_dataset(cfg, store)
    m = shard_dataset(cfg.model_copy(update={"on_empty_class": "skip"}), store).manifest
    assert m.class_names == ["a", "c"] and m.num_classes == 2
    assert [(s.path, s.reason) for s in m.skipped] == [("b/", "empty class folder")]


def test_a_class_of_only_bad_files_is_no_class(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, 4, classes=("a",))
    (root / "b").mkdir()
    (root / "b" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = DataConfig(
        dataset=f"imagefolder:{root}", holdout_fraction=0.4, on_bad_file="skip", workers=0
    )
    with pytest.raises(ValueError, match=r"class\(es\) \['b'\] .* no usable image"):
        shard_dataset(cfg, Store(StorageConfig(root=str(tmp_path / "store"))))


def test_a_jsonl_or_csv_listing_of_urls_and_labels(tmp_path):
    root = tmp_path / "imgs"
    paths = make_folder(root, 5, classes=("x", "y"))
    rows = [{"url": str(p.relative_to(root)), "label": p.parent.name} for p in paths]
    rows[0]["url"] = str(paths[0])  # an absolute path works too
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "list.csv").write_text(
        "url,label\n" + "".join(f"{r['url']},{r['label']}\n" for r in rows)
    )
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    cfg = DataConfig(dataset=f"imagefolder:{root}/list.jsonl", holdout_fraction=0.3, workers=0)
    m = shard_dataset(cfg, store).manifest
    assert m.class_names == ["x", "y"] and m.dataset == "imagefolder-list"
    assert m.split("train").count + m.split("holdout").count == 10
    csv = shard_dataset(cfg.model_copy(update={"dataset": f"imagefolder:{root}/list.csv"}), store)
    # another listing is another source (another folder), with the same images: the same bytes
    assert csv.manifest.prefix != m.prefix
    assert {k: [h for _, h in v] for k, v in _shards(csv.manifest).items()} == {
        k: [h for _, h in v] for k, v in _shards(m).items()
    }

    (root / "bad.jsonl").write_text('{"url": "x/0000.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 1: needs a url and a label"):
        shard_dataset(cfg.model_copy(update={"dataset": f"imagefolder:{root}/bad.jsonl"}), store)
