"""The requests a stage counts (`tasks.usage`) are those the S3 test server logged: moto's own
request recorder, on a server of this test's own, while the shard stage runs with Ray tasks
writing the shards (so the workers' reports to the driver's ledger are part of the sum)."""

from __future__ import annotations

import base64
import collections
import json
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tasks.config import DataConfig, RayConfig, StorageConfig
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.usage import StageMeter, process_usage
from tests.support.s3 import MotoServer, create_bucket, s3_credentials

pytestmark = pytest.mark.slow  # a Ray cluster and an S3 server process


def _kind(method: str, url: str) -> str:
    """A logged request's kind, from its HTTP method and query (what a bill lists)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    bucket_only = parts.path.strip("/").count("/") == 0
    if method == "HEAD":
        return "head"
    if method == "GET":
        return "list" if bucket_only or "list-type" in query else "get"
    if method == "PUT":
        return "part" if "partNumber" in query else "put"
    if method == "POST":
        return "delete" if "delete" in query else "put"  # ?uploads / ?uploadId: multipart
    if method == "DELETE":
        return "delete"
    return "other"


def _moto(endpoint: str, action: str) -> bytes:
    request = urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method="POST")
    if action == "download-recording":
        request.method = "GET"
    with urllib.request.urlopen(request) as answer:
        return bytes(answer.read())


def test_a_stages_request_counts_match_the_servers_log(tmp_path: Path) -> None:
    recording = tmp_path / "moto-recording.jsonl"
    # The stage starts its own local Ray cluster (or uses the session's), whose workers inherit
    # the test credentials.
    with s3_credentials(), MotoServer({"MOTO_RECORDER_FILEPATH": str(recording)}) as moto:
        bucket = create_bucket(moto.endpoint)
        storage = StorageConfig(root=f"s3://{bucket}/pipeline", endpoint_url=moto.endpoint)
        cfg = DataConfig(max_images=100, samples_per_shard=25, workers=2)  # Ray tasks write

        _moto(moto.endpoint, "reset-recording")
        _moto(moto.endpoint, "start-recording")
        meter, driver = StageMeter(), process_usage()
        result = shard_dataset(cfg, Store(storage), RayConfig(num_cpus=2))
        used, driver = meter.stop(), process_usage() - driver
        _moto(moto.endpoint, "stop-recording")
        log = [
            json.loads(line)
            for line in _moto(moto.endpoint, "download-recording").split(b"\n")
            if line
        ]

    logged = collections.Counter(_kind(e["method"], e["url"]) for e in log)
    assert used.requests == dict(logged), f"counted {used.requests}, the server logged {logged}"
    shards = sum(len(s.shards) for s in result.manifest.splits.values())
    # the shards were written by the Ray tasks, whose counts reached the driver through the ledger
    assert shards >= 2 and used.requests["put"] - driver.requests.get("put", 0) >= shards
    sent = sum(
        len(base64.b64decode(e["body"]) if e["body_encoded"] else e["body"].encode())
        for e in log
        if _kind(e["method"], e["url"]) in ("put", "part") and e["method"] == "PUT"
    )
    assert used.bytes_written == sent > 0
