"""The shard stage on Ray: the same bytes whatever the number of workers, an S3 bucket as source
and destination, and a shard task SIGKILLed mid-shard."""

from __future__ import annotations

import os
import signal
import threading
import time

import boto3
import pytest

from tasks.config import DataConfig, StorageConfig
from tasks.records import DatasetManifest
from tasks.shard.sources import BadImageError
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tests.support import procs
from tests.support.imagefolders import make_folder
from tests.support.shards import verify_manifest

pytestmark = pytest.mark.slow  # a Ray cluster, an S3 server process, a SIGKILLed task


def _hashes(manifest: DatasetManifest) -> dict[str, list[str]]:
    return {split: [s.sha256 for s in info.shards] for split, info in manifest.splits.items()}


def test_ray_workers_and_s3_give_the_same_shards(ray_cluster, tmp_path, s3_storage):
    root = tmp_path / "imgs"
    paths = make_folder(root, 24, classes=("a", "b", "c"))
    cfg = DataConfig(dataset=f"imagefolder:{root}", samples_per_shard=12, workers=0)
    reference = shard_dataset(cfg, Store(StorageConfig(root=str(tmp_path / "s0")))).manifest
    store = Store(StorageConfig(root=str(tmp_path / "s2")))
    got = shard_dataset(cfg.model_copy(update={"workers": 2}), store).manifest
    assert _shards_of(got) == _shards_of(reference) and len(got.split("train").shards) >= 4

    # the same folder in a bucket, read by Ray tasks, written to another bucket
    bucket = s3_storage.root.removeprefix("s3://").split("/")[0]
    s3 = boto3.client("s3", endpoint_url=s3_storage.endpoint_url, region_name="us-east-1")
    for p in paths:
        s3.upload_file(str(p), bucket, f"source/imgs/{p.relative_to(root)}")
    store = Store(s3_storage)
    s3_cfg = cfg.model_copy(
        update={"dataset": f"imagefolder:s3://{bucket}/source/imgs/", "workers": 2}
    )
    from_s3 = shard_dataset(s3_cfg, store)
    # another source (ETags, not mtimes, name the chunks), the same images: the same bytes
    assert _hashes(from_s3.manifest) == _hashes(reference) and from_s3.written > 0
    assert from_s3.manifest.source == f"s3://{bucket}/source/imgs"
    assert verify_manifest(store, from_s3.manifest) == []
    s3.upload_file(str(paths[0]), bucket, "source/imgs/a/0000x.png")  # the bucket grows
    grown = shard_dataset(s3_cfg, store)
    # one chunk changed: rewritten (as two, when the new key is itself a boundary); the rest kept
    assert grown.written in (1, 2) and grown.kept == from_s3.written - 1
    # a broken object: the task's error, unwrapped from Ray's, names it
    s3.put_object(Bucket=bucket, Key="source/imgs/b/0000y.png", Body=b"\x89PNG junk")
    with pytest.raises(BadImageError, match=rf"s3://{bucket}/source/imgs/b/0000y\.png cannot be"):
        shard_dataset(s3_cfg, store)


def _shards_of(manifest: DatasetManifest) -> dict[str, list[tuple[str, str]]]:
    return {s: [(x.key, x.sha256) for x in i.shards] for s, i in manifest.splits.items()}


def _shard_task_pids() -> list[int]:
    """This cluster's worker processes running a shard task right now (Ray titles them
    ray::<task>); those of another Ray cluster on the machine are not ours to kill."""
    return procs.titled(b"ray::write_chunk")


def test_a_shard_task_killed_mid_shard(ray_cluster, tmp_path):
    root = tmp_path / "imgs"
    make_folder(root, 150, classes=("a", "b"), size=64)
    cfg = DataConfig(dataset=f"imagefolder:{root}", image_size=16, samples_per_shard=60, workers=2)
    reference = shard_dataset(
        cfg.model_copy(update={"workers": 0}), Store(StorageConfig(root=str(tmp_path / "ref")))
    ).manifest
    out = tmp_path / "out"
    store = Store(StorageConfig(root=str(out)))
    results: list[object] = []
    run = threading.Thread(target=lambda: results.append(shard_dataset(cfg, store)))
    run.start()
    killed = []
    deadline = time.monotonic() + 60
    while run.is_alive() and not killed and time.monotonic() < deadline:
        # kill a task while a shard of it is being written (its hidden temporary file exists)
        if any(p.name.startswith(".tmp-") for p in out.rglob("*.tar*")):
            for pid in _shard_task_pids()[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.002)
    run.join(timeout=120)
    assert killed, "no shard task was caught mid-shard"
    (result,) = results  # Ray re-ran the killed task; the job completed
    manifest = result.manifest
    assert _shards_of(manifest) == _shards_of(reference)  # keys and bytes
    assert verify_manifest(store, manifest) == []
    # nothing partial is visible: the store lists the manifest and its shards, nothing else
    listed = set(store.list(manifest.prefix))
    assert listed == {manifest.key} | {s.key for i in manifest.splits.values() for s in i.shards}
    assert shard_dataset(cfg, store).reused  # and a rerun finds it complete
