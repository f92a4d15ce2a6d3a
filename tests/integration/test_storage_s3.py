"""Atomic writes against the S3-compatible server: s3fs would commit a partial object when an
exception escapes `with fs.open(...)`; ours must not."""

from __future__ import annotations

import pytest

from tasks.storage import Store


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("size", [1024, 12 << 20])  # one-shot PUT and multipart upload
def test_interrupted_s3_write_leaves_nothing(s3_storage, size):
    store = Store(s3_storage)
    with pytest.raises(Interrupted), store.open_atomic("x/partial.tar") as f:
        f.write(b"y" * size)
        raise Interrupted
    assert not store.exists("x/partial.tar") and store.list("x") == []
    store.write_bytes("x/whole.tar", b"z" * size)
    assert store.read_bytes("x/whole.tar") == b"z" * size


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    from tasks.config import StorageConfig
    from tasks.storage import StorageError

    with pytest.raises(StorageError, match="does not exist"):
        Store(StorageConfig(root="s3://no-such-bucket-xyz/p", endpoint_url=s3_endpoint))
