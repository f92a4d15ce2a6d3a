"""The store against the S3-compatible server: s3fs would commit a partial object when an exception
escapes `with fs.open(...)`, ours must not; a short outage is ridden out; missing and refused
credentials are reported as such, not as a missing bucket."""

from __future__ import annotations

import logging
import os
import socket
import threading

import boto3
import pytest
import s3fs

from tasks.config import StorageConfig
from tasks.errors import describe_failure
from tasks.storage import StorageCredentialsError, StorageError, StorageUnavailableError, Store


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("size", [1024, 20 << 20])  # staged in memory, and in a temporary file
def test_interrupted_s3_write_leaves_nothing(s3_storage, size):
    store = Store(s3_storage)
    with pytest.raises(Interrupted), store.open_atomic("x/partial.tar") as f:
        f.write(b"y" * size)
        raise Interrupted
    assert not store.exists("x/partial.tar") and store.list("x") == []
    with store.open_atomic("x/whole.tar") as f:
        f.write(b"z" * size)
    assert store.read_bytes("x/whole.tar") == b"z" * size


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StorageError, match="does not exist"):
        Store(StorageConfig(root="s3://no-such-bucket-xyz/p", endpoint_url=s3_endpoint))


def test_a_short_outage_is_ridden_out_by_writes_and_streamed_reads(
    s3_endpoint, s3_bucket, s3_proxy, caplog
):
    """An upload started while the store is down, and a read stream cut in the middle, both finish
    once it is back, whole, leaving no multipart upload behind."""
    store = Store(StorageConfig(root=f"s3://{s3_bucket}/p", endpoint_url=s3_proxy.endpoint))
    moto = boto3.client("s3", endpoint_url=s3_endpoint)
    big = os.urandom(52 << 20)  # beyond s3fs's 50 MiB read-ahead: the stream needs a second range
    moto.put_object(Bucket=s3_bucket, Key="p/big.bin", Body=big)

    def outage(seconds: float) -> threading.Thread:
        s3_proxy.stop()
        back = threading.Timer(seconds, s3_proxy.start)
        back.start()
        return back

    caplog.set_level(logging.WARNING, logger="tasks.retry")
    back = outage(1.5)
    store.write_bytes("w/obj.bin", b"w" * 1000)
    back.join()
    assert moto.get_object(Bucket=s3_bucket, Key="p/w/obj.bin")["Body"].read() == b"w" * 1000

    with store.open_read("big.bin") as f:
        head = f.read(1 << 20)  # s3fs fetches the first 51 MiB
        back = outage(1.5)
        rest = f.read()
        back.join()
    assert head + rest == big
    retried = [r.getMessage() for r in caplog.records if "succeeded after" in r.getMessage()]
    assert any(m.startswith(f"writing s3://{s3_bucket}/p/w/obj.bin") for m in retried)
    assert any(m.startswith(f"reading s3://{s3_bucket}/p/big.bin") for m in retried)
    assert moto.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


_NO_CREDENTIALS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def test_missing_credentials_are_named_not_a_missing_bucket(
    s3_endpoint, s3_bucket, tmp_path, monkeypatch
):
    empty = tmp_path / "empty"
    empty.write_text("")
    for name in _NO_CREDENTIALS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    root = f"s3://{s3_bucket}/p"
    # s3fs shares one client per set of options and resolves credentials once: start afresh, and
    # leave no credential-less client behind for the other tests.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageCredentialsError) as err:
            Store(StorageConfig(root=root, endpoint_url=s3_endpoint))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    message = str(err.value)
    assert message.startswith(f"no S3 credentials found for storage root {root!r}")
    assert s3_endpoint in message and "aws s3 mb" not in message  # not "create the bucket"
    for how in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "instance"):
        assert how in message
    assert describe_failure(err.value) == message  # the CLI's line: ours, not botocore's


def test_refused_credentials_are_named_not_a_missing_bucket(s3_endpoint_checking_keys):
    # The server's one unchecked request creates the bucket; the session's keys are unknown to it.
    boto3.client("s3", endpoint_url=s3_endpoint_checking_keys).create_bucket(Bucket="exists")
    with pytest.raises(StorageCredentialsError) as err:
        Store(StorageConfig(root="s3://exists/p", endpoint_url=s3_endpoint_checking_keys))
    message = str(err.value)
    assert message.startswith(
        f"the object store at {s3_endpoint_checking_keys} refused the S3 credentials for "
        "storage root 's3://exists/p' (InvalidAccessKeyId:"
    )
    assert "AWS_ACCESS_KEY_ID" in message and "aws s3 mb" not in message  # not "create the bucket"
    assert describe_failure(err.value) == message  # the CLI's line: ours, not botocore's


def test_an_unreachable_endpoint_is_described_by_our_message():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(StorageUnavailableError) as err:
        Store(StorageConfig(root="s3://b/p", endpoint_url=endpoint, retry_budget_s=1))
    message = describe_failure(err.value)
    assert message == str(err.value) and message.startswith(
        f"object store unreachable at endpoint {endpoint}"
    )
