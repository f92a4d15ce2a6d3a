"""Sampling: an image depends on its seed only (not on batch size, task split or worker); a rerun
resumes; outputs carry their seeds."""

from __future__ import annotations

import json

import pytest

from tasks import layout
from tasks.config import PipelineConfig, SampleConfig, StorageConfig
from tasks.records import Checkpoint, SampleSet
from tasks.sample import find_sample_set, sample_images, sample_seed_range
from tasks.shard import shard_dataset
from tasks.storage import Store
from tasks.train_loop import TrainJob, run_training
from tasks.webdata import iter_raw_samples

CFG = {
    "data": {"max_images": 80, "samples_per_shard": 40},
    "model": {
        "base_channels": 8,
        "channel_mult": [1, 2],
        "attention_resolutions": [4],
        "class_conditional": True,
    },
    "train": {"batch_size": 8, "checkpoint_every": 2, "log_every": 2, "steps": 2},
    "sample": {"num_images": 12, "steps": 4, "images_per_task": 5, "batch_size": 4},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    store = Store(StorageConfig(root=str(tmp_path_factory.mktemp("store"))))
    cfg = PipelineConfig.model_validate({**CFG, "storage": {"root": store.config.root}})
    manifest = shard_dataset(cfg.data, store).manifest
    out = run_training(TrainJob(config=cfg, target_step=2, manifest=manifest))
    return store, cfg, out.checkpoint


def _weights(store: Store, ckpt: Checkpoint) -> str:
    """A weights-only file of the checkpoint's EMA, as the sample stage writes for its tasks."""
    from tasks.sample import _write_weights

    key = f"w/{ckpt.step}.pt"
    if not store.exists(key):
        _write_weights(store, ckpt, True, key)
    return key


def _range(store: Store, ckpt: Checkpoint, sc: SampleConfig, a: int, b: int, key: str):
    return sample_seed_range(
        store.config, ckpt, _weights(store, ckpt), sc, a, b, key, key.replace(".tar", ".json")
    )


def _pngs(store: Store, key: str) -> dict[int, bytes]:
    return {json.loads(s["json"])["seed"]: s["png"] for s in iter_raw_samples(store, [key])}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "heun"])
def test_same_seed_same_image_whatever_the_batch(checkpoint, sampler):
    store, _, ckpt = checkpoint
    by_batch = {}
    for bs in (1, 8):
        sc = SampleConfig(
            sampler=sampler, steps=4, batch_size=bs, eta=1.0 if sampler == "ddim" else 0.0
        )
        _range(store, ckpt, sc, 3, 11, f"t/{sampler}-{bs}.tar")
        by_batch[bs] = _pngs(store, f"t/{sampler}-{bs}.tar")
    assert sorted(by_batch[1]) == list(range(3, 11))
    assert by_batch[1] == by_batch[8]
    assert len(set(by_batch[1].values())) == 8  # different seeds, different images


def test_seed_range_is_resumable(checkpoint):
    store, _, ckpt = checkpoint
    sc = SampleConfig(steps=2, batch_size=4)
    first, first_reused = _range(store, ckpt, sc, 0, 4, "r/shard-000000.tar")
    stamp = store.fs.info(store.path("r/shard-000000.tar"))["mtime"]
    again, again_reused = _range(store, ckpt, sc, 0, 4, "r/shard-000000.tar")
    assert not first_reused and again_reused and again == first
    assert store.fs.info(store.path("r/shard-000000.tar"))["mtime"] == stamp


def test_ray_fan_out_matches_a_single_task(checkpoint, ray_cluster):
    store, cfg, ckpt = checkpoint
    assert find_sample_set(store, ckpt, cfg.sample) is None
    manifest = sample_images(store, cfg.sample, cfg.ray, ckpt)
    assert manifest.num_images == 12 and len(manifest.shards) == 3  # 5 + 5 + 2
    assert (
        SampleSet.read(store, manifest.key) == manifest == find_sample_set(store, ckpt, cfg.sample)
    )
    assert manifest.key == layout.sample_manifest(
        layout.sample_set_prefix("nightly", manifest.name)
    )
    # the tasks read a weights-only file, not the checkpoint with the raw model and AdamW moments
    assert store.size(manifest.weights_key) < store.size(ckpt.key) / 3
    assert sum(s.count for s in manifest.shards) == 12
    fanned = {}
    for s in manifest.shards:
        assert store.sha256(s.key) == s.sha256
        fanned |= _pngs(store, s.key)
    _range(store, ckpt, cfg.sample, 0, 12, "one/shard.tar")
    assert fanned == _pngs(store, "one/shard.tar")
    labels = [json.loads(s["json"])["label"] for s in iter_raw_samples(store, ["one/shard.tar"])]
    assert labels == [seed % 10 for seed in range(12)]
    # the complete set is not redone, and finding it needs no checkpoint bytes
    data = store.read_bytes(ckpt.key)
    store.delete(ckpt.key)
    try:
        assert sample_images(store, cfg.sample, cfg.ray, ckpt) == manifest
    finally:
        store.write_bytes(ckpt.key, data)
