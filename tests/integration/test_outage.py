"""Object store outage: the S3 test server becomes unreachable for ~30 s in the middle of a run
(while training writes checkpoints; while sampling writes shards) and comes back on the same port.
The run rides it out and completes: no partial object visible, nothing written twice, the same
bytes as without the outage. An outage longer than the retry budget fails with one clear error
naming the endpoint.

The outage is a TCP proxy in front of moto (tests/support/s3.py) that is killed and restarted:
moto keeps its buckets in memory, so restarting moto itself would lose them. The checks read the
bucket straight from moto with boto3, not through the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import threading
import time

import boto3
import pytest
import torch

from diffusion_core.checkpoint import load_checkpoint
from tasks import layout
from tasks.config import StorageConfig
from tasks.records import Checkpoint, SampleSet
from tasks.retry import is_transient
from tasks.sample.stage import sample_images
from tasks.shard.stage import shard_dataset
from tasks.storage import StorageUnavailableError, Store, open_store
from tasks.train.loop import TrainJob, run_training
from tests.support.config import CLASS_CONDITIONAL, LONGER_TRAINING, tiny_config
from tests.support.training import shard_and_train

pytestmark = pytest.mark.slow  # an S3 server, a proxy process, Ray, and two 30 s outages

OUTAGE_S = 30.0

# 24 images in 8 seed ranges of 3: the outage falls between the first range and the last.
SAMPLING = {"sample": {"num_images": 24, "steps": 8, "images_per_task": 3, "batch_size": 3}}


def _objects(moto, bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, read from moto directly."""
    pages = moto.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: moto.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _open_uploads(moto, bucket: str) -> list[str]:
    return [u["Key"] for u in moto.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_training_rides_out_an_outage_while_writing_checkpoints(
    s3_endpoint, s3_bucket, s3_proxy, tmp_path, caplog
):
    storage = StorageConfig(root=f"s3://{s3_bucket}/pipeline", endpoint_url=s3_proxy.endpoint)
    cfg = tiny_config(storage, LONGER_TRAINING, {"train": {"run_id": "outage"}})
    store = open_store(storage)
    manifest = shard_dataset(cfg.data, store).manifest
    run = cfg.train.run_id
    trained = threading.Event()
    finished_in_the_outage: list[bool] = []

    def end_outage() -> None:
        finished_in_the_outage.append(trained.is_set())
        s3_proxy.start()

    back = threading.Timer(OUTAGE_S, end_outage)

    def at_log_step(metrics: dict[str, float]) -> None:
        # Called at step 6 just before its checkpoint is saved (log_every = checkpoint_every), so
        # the store goes away exactly when the checkpoint's upload begins.
        if metrics["step"] == 6:
            s3_proxy.stop()
            back.start()

    caplog.set_level(logging.INFO, logger="tasks")
    result = run_training(
        TrainJob(config=cfg, target_step=12, manifest=manifest), report=at_log_step
    )
    trained.set()
    back.join()

    assert result.checkpoint.step == 12 and result.trained_steps == 12
    assert result.resumed_from is None
    assert finished_in_the_outage == [False]  # the run waited for the store to come back
    messages = [r.getMessage() for r in caplog.records]
    ckpt6 = store.url(layout.checkpoint(run, 6))
    retried = [m for m in messages if "retrying for up to" in m]
    assert retried and retried[0].startswith(f"writing {ckpt6} failed (EndpointConnectionError")
    assert any(m.startswith(f"writing {ckpt6} succeeded after") for m in messages)
    # each checkpoint was saved once, and training did not redo a step
    saved = [int(m.split()[2]) for m in messages if m.startswith("checkpoint step ")]
    assert saved == [3, 6, 9, 12]

    moto = boto3.client("s3", endpoint_url=s3_endpoint)
    objects = _objects(moto, s3_bucket)
    prefix = "pipeline/" + layout.checkpoints_prefix(run)
    checkpoints = sorted(k for k in objects if k.startswith(prefix + "/"))
    assert checkpoints == [f"pipeline/{layout.latest_checkpoint(run)}"] + [
        f"pipeline/{layout.checkpoint(run, s)}"
        for s in (6, 9, 12)  # keep_checkpoints = 3
    ]
    dataset = {f"pipeline/{manifest.key}"} | {
        f"pipeline/{s.key}" for split in manifest.splits.values() for s in split.shards
    }
    logs = {f"pipeline/{layout.train_history(run)}"} | {
        k for k in objects if k.startswith(f"pipeline/{layout.tensorboard_prefix(run)}/")
    }
    # nothing else: no temporary, no partial
    assert set(objects) == set(checkpoints) | dataset | logs
    assert _open_uploads(moto, s3_bucket) == []
    latest = Checkpoint.parse(
        json.loads(objects[f"pipeline/{layout.latest_checkpoint(run)}"]), "latest.json"
    )
    assert latest == result.checkpoint and latest.key == layout.checkpoint(run, 12)
    assert hashlib.sha256(objects[f"pipeline/{latest.key}"]).hexdigest() == latest.sha256
    for key in checkpoints[1:]:  # every checkpoint is whole: it loads, and holds its own step
        assert load_checkpoint(objects[key])["step"] == int(re.findall(r"\d+", key)[-1])

    # the same weights as an uninterrupted run
    local = cfg.model_copy(update={"storage": StorageConfig(root=str(tmp_path / "store"))})
    plain = run_training(
        TrainJob(
            config=local,
            target_step=12,
            manifest=shard_dataset(local.data, open_store(local.storage)).manifest,
        )
    )
    ours = load_checkpoint(objects[f"pipeline/{latest.key}"])
    theirs = load_checkpoint(plain.checkpoint.read_bytes(open_store(local.storage)))
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name


def _members(shard: bytes) -> dict[int, dict[str, bytes]]:
    """seed -> the sample's members (png, json, cls) of a shard's tar bytes."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member)
            assert data is not None
            samples.setdefault(key, {})[ext] = data.read()
    return {json.loads(s["json"])["seed"]: s for s in samples.values()}


def test_sampling_rides_out_an_outage_while_writing_shards(s3_endpoint, s3_proxy, ray_cluster):
    moto = boto3.client("s3", endpoint_url=s3_endpoint)
    quiet, flaky = (f"outage-{name}-{time.monotonic_ns()}" for name in ("quiet", "flaky"))
    for bucket in (quiet, flaky):
        moto.create_bucket(Bucket=bucket)
    # A checkpoint, and a reference sample set made without an outage.
    reference_cfg = tiny_config(
        StorageConfig(root=f"s3://{quiet}/pipeline", endpoint_url=s3_endpoint),
        CLASS_CONDITIONAL,
        SAMPLING,
    )
    reference_store = open_store(reference_cfg.storage)
    _, ckpt = shard_and_train(reference_store, reference_cfg)
    reference = sample_images(reference_store, reference_cfg.sample, reference_cfg.ray, ckpt)
    # The same checkpoint in the bucket behind the proxy.
    moto.copy_object(
        Bucket=flaky,
        Key=f"pipeline/{ckpt.key}",
        CopySource={"Bucket": quiet, "Key": f"pipeline/{ckpt.key}"},
    )
    cfg = reference_cfg.model_copy(
        update={
            "storage": StorageConfig(root=f"s3://{flaky}/pipeline", endpoint_url=s3_proxy.endpoint)
        }
    )
    store = open_store(cfg.storage)
    set_prefix = "pipeline/" + reference.prefix
    seen: dict[str, int] = {}
    done = threading.Event()

    def receipts() -> int:
        listing = moto.list_objects_v2(Bucket=flaky, Prefix=set_prefix + "/shard-")
        return sum(o["Key"].endswith(".json") for o in listing.get("Contents", []))

    def outage_after_the_first_shard() -> None:
        while not done.is_set():
            if n := receipts():
                s3_proxy.stop()
                seen["at_stop"] = n
                time.sleep(OUTAGE_S)
                seen["finished_in_the_outage"] = done.is_set()
                s3_proxy.start()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=outage_after_the_first_shard)
    watcher.start()
    try:
        result = sample_images(store, cfg.sample, cfg.ray, ckpt)
    finally:
        done.set()
        watcher.join()

    n_ranges = 24 // 3
    assert 1 <= seen["at_stop"] < n_ranges  # the outage cut the run ...
    assert seen["finished_in_the_outage"] is False  # ... and the run waited for the store
    assert result.name == reference.name and len(result.shards) == n_ranges
    assert (
        SampleSet.parse(
            json.loads(moto.get_object(Bucket=flaky, Key=f"pipeline/{result.key}")["Body"].read()),
            "manifest",
        )
        == result
    )
    objects = _objects(moto, flaky)
    by_seed: dict[int, dict[str, bytes]] = {}
    for shard in result.shards:
        data = objects[f"pipeline/{shard.key}"]
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
        members = _members(data)
        assert sorted(members) == list(range(shard.seed_start, shard.seed_stop))
        assert not set(members) & set(by_seed)  # each seed in one shard only
        by_seed |= members
    assert sorted(by_seed) == list(range(24))
    expected = {
        f"pipeline/{ckpt.key}",
        f"pipeline/{result.key}",
        f"pipeline/{result.weights_key}",
        f"pipeline/{layout.sample_weights_record(result.prefix)}",
    }
    for n in range(n_ranges):
        expected |= {
            f"pipeline/{layout.sample_shard(result.prefix, n)}",
            f"pipeline/{layout.sample_receipt(result.prefix, n)}",
        }
    assert set(objects) == expected  # no temporary or partial object
    # A request in flight when the proxy died may have opened a multipart upload whose id never
    # came back, so it cannot be aborted; it is invisible, and its object was written whole anyway.
    assert set(_open_uploads(moto, flaky)) <= expected

    # the same images as the run without an outage
    reference_seeds: dict[int, dict[str, bytes]] = {}
    for shard in reference.shards:
        reference_seeds |= _members(reference_store.read_bytes(shard.key))
    assert by_seed == reference_seeds


def test_an_outage_longer_than_the_budget_fails_with_one_clear_error(s3_bucket, s3_proxy):
    budget = 2.0
    root = f"s3://{s3_bucket}/pipeline"
    cfg = StorageConfig(root=root, endpoint_url=s3_proxy.endpoint, retry_budget_s=budget)
    store = Store(cfg)
    s3_proxy.stop()

    for what, call in [
        (f"writing {root}/runs/r/x.pt", lambda: store.write_bytes("runs/r/x.pt", b"x" * 100)),
        (f"reading {root}/{layout.latest_checkpoint('r')}", lambda: Checkpoint.latest(store, "r")),
        (f"checking bucket {s3_bucket!r}", lambda: Store(cfg)),
    ]:
        with pytest.raises(StorageUnavailableError) as err:
            call()
        message = str(err.value)
        assert message.startswith(
            f"object store unreachable at endpoint {s3_proxy.endpoint} (storage root {root!r}): "
            f"{what} kept failing for "
        ), message
        retried = re.search(r"kept failing for [\d.]+ s, (\d+) attempts ", message)
        assert retried and int(retried[1]) > 1, message  # it retried through the budget
        assert "(storage.retry_budget_s = 2); last error: EndpointConnectionError" in message
        assert "Check that the endpoint is up" in message
        assert is_transient(err.value)  # Prefect's stage retry gives it one more chance later

    s3_proxy.start()
    assert not store.exists("runs/r/x.pt")
