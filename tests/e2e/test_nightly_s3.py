"""The nightly flow as a user runs it, against a real S3-compatible server process (moto on
127.0.0.1), a local Ray cluster with 2 DDP training workers, and Prefect's test harness."""

from __future__ import annotations

import hashlib
import json
import math

import boto3
import pytest

pytestmark = pytest.mark.slow

TINY = [
    "data.max_images=400",
    "data.samples_per_shard=64",
    "model.base_channels=16",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[4]",
    "train.steps=20",
    "train.steps_per_night=10",
    "train.checkpoint_every=10",
    "train.log_every=10",
    "train.batch_size=16",
    "train.num_workers=2",
    "train.warmup_steps=5",
    "sample.num_images=40",
    "sample.steps=10",
    "sample.images_per_task=20",
    "sample.batch_size=20",
    "evaluate.metrics=[fid,kid]",
    "evaluate.kid_subset_size=20",
    "evaluate.grid_images=16",
]


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def _objects(endpoint: str, bucket: str) -> dict[str, dict]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj
    return out


def _sha256(endpoint: str, bucket: str, key: str) -> str:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()


def test_nightly_twice_on_s3(s3_endpoint, s3_bucket, ray_cluster, prefect_harness):
    from flows.nightly import nightly

    overrides = [
        f"storage.root=s3://{s3_bucket}/pipeline",
        f"storage.endpoint_url={s3_endpoint}",
        *TINY,
    ]
    first = nightly(overrides=overrides)

    objects = _objects(s3_endpoint, s3_bucket)
    keys = set(objects)
    root = "pipeline/"
    manifest_key = root + first["manifest_key"]
    assert manifest_key in keys
    manifest = json.loads(
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        .get_object(Bucket=s3_bucket, Key=manifest_key)["Body"]
        .read()
    )
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert (
        len(manifest["splits"]["train"]["shards"]) >= 2
        and manifest["splits"]["holdout"]["count"] > 0
    )
    for shard in shards:  # every manifest checksum matches its object
        assert _sha256(s3_endpoint, s3_bucket, root + shard["key"]) == shard["sha256"], shard["key"]

    # checkpoints (model, EMA, optimizer, step) and their pointer
    assert first["step"] == 20 and first["resumed_from"] is None
    assert root + first["checkpoint_key"] in keys
    assert root + "runs/nightly/checkpoints/latest.json" in keys
    # samples: shards with receipts, manifest last
    assert root + first["samples_key"] in keys
    sample_shards = [k for k in keys if "/samples/" in k and k.endswith(".tar")]
    assert len(sample_shards) == 2
    # metrics, grid, report
    m = first["metrics"]
    assert math.isfinite(m["fid"]) and m["fid"] >= 0
    assert m["num_images"] == 40 and m["extractor"]["standard"] is False
    for key in (m["metrics_key"], m["grid_key"], m["report_key"]):
        assert root + key in keys, key
    assert root + first["report_key"] in keys
    assert first["promotion"]["promoted"] is True  # the first model is always promoted
    assert root + "models/default/current.json" in keys

    second = nightly(overrides=overrides)
    assert second["shards_reused"] is True
    after = _objects(s3_endpoint, s3_bucket)
    for shard in shards:  # reused, not rewritten
        assert (
            after[root + shard["key"]]["LastModified"]
            == objects[root + shard["key"]]["LastModified"]
        )
        assert after[root + shard["key"]]["ETag"] == objects[root + shard["key"]]["ETag"]
    assert second["resumed_from"] == 20 and second["step"] == 30 and second["trained_steps"] == 10
    assert second["samples_key"] != first["samples_key"]  # new checkpoint, new sample set
    assert math.isfinite(second["metrics"]["fid"])
    history = json.loads(
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        .get_object(Bucket=s3_bucket, Key=root + "models/default/history.json")["Body"]
        .read()
    )
    assert len(history) == 2 and history[1]["checkpoint_key"] == second["checkpoint_key"]
