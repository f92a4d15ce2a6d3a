"""The nightly flow as a user runs it, against a real S3-compatible server process (moto on
127.0.0.1), a local Ray cluster with 2 DDP training workers, and Prefect's test harness."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest

from tasks import layout
from tasks.records import NightlySummary
from tests.support.config import NIGHTLY, tiny_overrides
from tests.support.paths import REPO

pytestmark = pytest.mark.slow


def _objects(endpoint: str, bucket: str) -> dict[str, dict]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj
    return out


def _read(endpoint: str, bucket: str, key: str) -> bytes:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _sha256(endpoint: str, bucket: str, key: str) -> str:
    return hashlib.sha256(_read(endpoint, bucket, key)).hexdigest()


def test_nightly_twice_on_s3(s3_endpoint, s3_bucket, ray_cluster, prefect_harness):
    from flows.nightly import nightly

    overrides = [
        f"storage.root=s3://{s3_bucket}/pipeline",
        f"storage.endpoint_url={s3_endpoint}",
        *tiny_overrides(NIGHTLY),
    ]
    # While the first nightly holds the run's lease (on the S3 server), a second one, started
    # as a user would, fails at once naming this process; the first goes on.
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(nightly, overrides=overrides)
        lease = "pipeline/" + layout.lease_object(layout.run_lease_prefix("nightly"))
        deadline = time.monotonic() + 300
        while lease not in _objects(s3_endpoint, s3_bucket) and time.monotonic() < deadline:
            assert not running.done(), running.result()
            time.sleep(0.5)
        refused = subprocess.run(
            [str(Path(sys.executable).parent / "diffpipe"), "nightly", *overrides],
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert f"pid {os.getpid()}" in refused.stderr, refused.stderr
        assert not running.done(), "the first nightly ended before the refused was refused"
        first = running.result()
    assert lease not in _objects(s3_endpoint, s3_bucket)  # released at the end

    objects = _objects(s3_endpoint, s3_bucket)
    keys = set(objects)
    root = "pipeline/"
    manifest_key = root + first.manifest_key
    assert manifest_key in keys
    manifest = json.loads(_read(s3_endpoint, s3_bucket, manifest_key))
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert (
        len(manifest["splits"]["train"]["shards"]) >= 2
        and manifest["splits"]["holdout"]["count"] > 0
    )
    for shard in shards:  # every manifest checksum matches its object
        assert _sha256(s3_endpoint, s3_bucket, root + shard["key"]) == shard["sha256"], shard["key"]

    # checkpoints (model, EMA, optimizer, step) and their pointer
    assert first.step == 20 and first.resumed_from is None
    assert root + first.checkpoint_key in keys
    assert root + layout.latest_checkpoint("nightly") in keys
    saved = json.loads(_read(s3_endpoint, s3_bucket, root + layout.run_config("nightly")))
    # the run saves the config as it ran: resolved, endpoint included
    assert saved["storage"] == {
        "root": f"s3://{s3_bucket}/pipeline",
        "endpoint_url": s3_endpoint,
        "region": "us-east-1",
        "retry_budget_s": 120.0,
    }
    # samples: shards with receipts, manifest last
    assert root + first.samples_key in keys
    sample_shards = [k for k in keys if "/samples/" in k and k.endswith(".tar")]
    assert len(sample_shards) == 2
    # metrics, grid, report
    m = first.metrics
    assert m.fid is not None and math.isfinite(m.fid) and m.fid >= 0
    assert m.num_images == 40 and m.extractor.standard is False
    for key in (m.key, m.grid_key, m.report_key):
        assert root + key in keys, key
    assert root + first.report_key in keys
    assert first.promotion.promoted is True  # the first model is always promoted
    assert root + layout.model_current("default") in keys
    stored = NightlySummary.parse(
        json.loads(_read(s3_endpoint, s3_bucket, root + layout.nightly_latest("nightly"))), "latest"
    )
    assert stored == first

    second = nightly(overrides=overrides)
    assert second.shards_reused is True
    after = _objects(s3_endpoint, s3_bucket)
    for shard in shards:  # reused, not rewritten
        assert (
            after[root + shard["key"]]["LastModified"]
            == objects[root + shard["key"]]["LastModified"]
        )
        assert after[root + shard["key"]]["ETag"] == objects[root + shard["key"]]["ETag"]
    assert second.resumed_from == 20 and second.step == 30 and second.trained_steps == 10
    assert second.samples_key != first.samples_key  # new checkpoint, new sample set
    assert second.metrics.fid is not None and math.isfinite(second.metrics.fid)
    history = json.loads(_read(s3_endpoint, s3_bucket, root + layout.model_history("default")))
    decisions = history["decisions"]
    assert len(decisions) == 2 and decisions[1]["checkpoint_key"] == second.checkpoint_key
