"""Sampling: an image depends on its seed only (not on batch size, task split or worker); a rerun
resumes; outputs carry their seeds."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import pytest

from tasks import layout
from tasks.config import SampleConfig, StorageConfig
from tasks.records import Checkpoint, SampleSet, SampleWeights
from tasks.sample.generate import SeedRangeSampler
from tasks.sample.stage import find_sample_set, sample_images, sample_set_name
from tasks.storage import Store
from tasks.webdata import iter_raw_samples
from tests.support import procs
from tests.support.config import CLASS_CONDITIONAL, tiny_config
from tests.support.sampling import sample_seed_range
from tests.support.training import shard_and_train

# 12 images in seed ranges of 5, batches of 4: a last range shorter than the others, and ranges
# that do not split into whole batches.
SAMPLING = {"sample": {"num_images": 12, "steps": 4, "images_per_task": 5, "batch_size": 4}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    store = Store(StorageConfig(root=str(tmp_path_factory.mktemp("store"))))
    cfg = tiny_config(store.config.root, CLASS_CONDITIONAL, SAMPLING)
    _, ckpt = shard_and_train(store, cfg)
    return store, cfg, ckpt


def _weights(store: Store, ckpt: Checkpoint) -> str:
    """A weights-only file of the checkpoint's EMA, as the sample stage writes for its tasks."""
    from tasks.sample.stage import _extract_weights

    key = f"w/{ckpt.step}.pt"
    if not store.exists(key):
        store.write_bytes(key, _extract_weights(store, ckpt, True)[0])
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


def _flip_a_byte(store: Store, key: str, at: int) -> None:
    data = bytearray(store.read_bytes(key))
    data[at] ^= 0x01
    store.write_bytes(key, bytes(data))


def test_a_damaged_shard_is_sampled_again_with_its_bytes(checkpoint, ray_cluster, caplog):
    """A shard changed after its receipt was written is not reused: the rerun names it and writes
    its seed range again, byte for byte, whether the set was complete or not."""
    store, cfg, ckpt = checkpoint
    sc = SampleConfig(num_images=6, steps=2, images_per_task=3, batch_size=3)
    first = sample_images(store, sc, cfg.ray, ckpt)
    original = {s.key: store.read_bytes(s.key) for s in first.shards}
    intact, damaged = (s.key for s in first.shards)
    stamp = store.fs.info(store.path(intact))["mtime"]

    _flip_a_byte(store, damaged, len(original[damaged]) // 2)
    with caplog.at_level(logging.INFO, logger="tasks.sample.stage"):
        again = sample_images(store, sc, cfg.ray, ckpt)
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.name == "tasks.sample.stage" and r.levelno == logging.WARNING
    ]
    assert len(warned) == 1 and store.url(damaged) in warned[0] and "damaged" in warned[0]
    assert "reusing it" not in caplog.text
    assert again.shards == first.shards and SampleSet.read(store, first.key) == again
    assert store.read_bytes(damaged) == original[damaged]
    assert store.fs.info(store.path(intact))["mtime"] == stamp  # the intact shard is kept

    # An incomplete set (no manifest yet) checks the shards its receipts describe just the same.
    store.delete(first.key)
    _flip_a_byte(store, intact, 700)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.sample.stage"):
        assert sample_images(store, sc, cfg.ray, ckpt).shards == first.shards
    assert store.url(intact) in caplog.text and store.url(damaged) not in caplog.text
    assert {k: store.read_bytes(k) for k in original} == original

    # Which weights the set holds is recorded beside them (weights.json); a set written before
    # that record existed gets it from the weights file once.
    record_key = layout.sample_weights_record(layout.sample_set_prefix(ckpt.run_id, first.name))
    record = SampleWeights.read(store, record_key)
    assert record.weights == "ema" and record.sha256 == store.sha256(first.weights_key)
    store.delete(record_key)
    store.delete(first.key)
    assert sample_images(store, sc, cfg.ray, ckpt).shards == first.shards
    assert SampleWeights.read(store, record_key) == record


# -- the job: a pool of actors, repeats, a killed actor, a resumed job ---------------------------
def _sampler_actor_pids() -> list[int]:
    """Our session's sampling actors: Ray names an actor's process `ray::SeedRangeSampler`."""
    return procs.titled(b"ray::SeedRangeSampler")


def test_a_killed_actor_is_replaced_and_every_seed_is_sampled_once(checkpoint, ray_cluster):
    store, cfg, ckpt = checkpoint
    sc = SampleConfig(
        num_images=12, steps=30, images_per_task=1, batch_size=1, workers=2, max_restarts=2
    )
    prefix = layout.sample_set_prefix(ckpt.run_id, sample_set_name(ckpt, sc, repeats=2))
    assert sample_set_name(ckpt, sc, repeats=2) != sample_set_name(ckpt, sc)
    seen: dict[str, object] = {}
    stop = threading.Event()

    def kill_one_actor_after_the_first_shard() -> None:
        while not stop.is_set():
            pids = _sampler_actor_pids()
            if pids and store.exists(layout.sample_receipt(prefix, 0)):
                seen["manifest_before"] = store.exists(layout.sample_manifest(prefix))
                seen["receipts_before"] = sum(
                    k.endswith(".json") for k in store.list(prefix) if "/shard-" in k
                )
                os.kill(pids[0], signal.SIGKILL)
                seen["killed"] = pids[0]
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_actor_after_the_first_shard)
    killer.start()
    try:
        result = sample_images(store, sc, cfg.ray, ckpt, repeats=2)
    finally:
        stop.set()
        killer.join()

    assert "killed" in seen and seen["manifest_before"] is False
    assert 1 <= seen["receipts_before"] < 24  # type: ignore[operator]  # the kill cut the job
    assert result.repeats == 2 and result.seed_ranges() == [(0, 12), (12, 24)]
    assert [s.seed_start for s in result.repeat_shards(1)] == list(range(12, 24))
    seeds = [
        json.loads(s["json"])["seed"]
        for s in iter_raw_samples(store, [s.key for s in result.shards])
    ]
    assert sorted(seeds) == list(range(24)) and len(seeds) == 24  # every seed exactly once
    # The same bytes as an uninterrupted run of the same ranges in this process.
    sampler = SeedRangeSampler(store.config, ckpt, result.weights_key, sc)
    for n, shard in enumerate(result.shards):
        again, _ = sampler.run(shard.seed_start, shard.seed_stop, f"u/{n}.tar", f"u/{n}.json")
        assert again.sha256 == shard.sha256 == store.sha256(shard.key)

    # A rerun of an incomplete set redoes only the missing range.
    stamps = {s.key: store.fs.info(store.path(s.key))["mtime"] for s in result.shards}
    store.delete(result.key)
    store.delete(result.shards[5].key)
    again_set = sample_images(store, sc, cfg.ray, ckpt, repeats=2)
    assert again_set.shards == result.shards
    changed = [k for k, t in stamps.items() if store.fs.info(store.path(k))["mtime"] != t]
    assert changed == [result.shards[5].key]
