"""Sampling: an image depends on its seed only (not on batch size, task split or worker); a rerun
resumes; outputs carry their seeds."""

from __future__ import annotations

import json

import pytest

from tasks.config import PipelineConfig, SampleConfig, StorageConfig
from tasks.sample import sample_images, sample_seed_range
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
    manifest = shard_dataset(cfg.data, store)
    out = run_training(
        TrainJob(
            config=cfg,
            storage=store.config,
            target_step=2,
            manifest=manifest,
        )
    )
    return store, cfg, out["checkpoint_key"]


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
        sample_seed_range(store.config, ckpt, sc, 3, 11, f"t/{sampler}-{bs}.tar")
        by_batch[bs] = _pngs(store, f"t/{sampler}-{bs}.tar")
    assert sorted(by_batch[1]) == list(range(3, 11))
    assert by_batch[1] == by_batch[8]
    assert len(set(by_batch[1].values())) == 8  # different seeds, different images


def test_seed_range_is_resumable(checkpoint):
    store, _, ckpt = checkpoint
    sc = SampleConfig(steps=2, batch_size=4)
    first = sample_seed_range(store.config, ckpt, sc, 0, 4, "r/shard-000000.tar")
    stamp = store.fs.info(store.path("r/shard-000000.tar"))["mtime"]
    again = sample_seed_range(store.config, ckpt, sc, 0, 4, "r/shard-000000.tar")
    assert not first["reused"] and again["reused"] and again["sha256"] == first["sha256"]
    assert store.fs.info(store.path("r/shard-000000.tar"))["mtime"] == stamp


def test_ray_fan_out_matches_a_single_task(checkpoint, ray_cluster):
    store, cfg, ckpt = checkpoint
    manifest = sample_images(cfg, ckpt)
    assert manifest["num_images"] == 12 and len(manifest["shards"]) == 3  # 5 + 5 + 2
    # the tasks read a weights-only file, not the checkpoint with the raw model and AdamW moments
    size = store.fs.size
    assert size(store.path(manifest["weights_key"])) < size(store.path(ckpt)) / 3
    assert sum(s["count"] for s in manifest["shards"]) == 12
    fanned = {}
    for s in manifest["shards"]:
        assert store.sha256(s["key"]) == s["sha256"]
        fanned |= _pngs(store, s["key"])
    sample_seed_range(store.config, ckpt, cfg.sample, 0, 12, "one/shard.tar")
    assert fanned == _pngs(store, "one/shard.tar")
    labels = [json.loads(s["json"])["label"] for s in iter_raw_samples(store, ["one/shard.tar"])]
    assert labels == [seed % 10 for seed in range(12)]
    assert sample_images(cfg, ckpt)["reused"] is True  # the complete set is not redone
