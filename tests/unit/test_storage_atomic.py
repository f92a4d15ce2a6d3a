"""An interrupted write leaves no partial object visible (local directory; S3 in integration), and a
local store does not retry."""

from __future__ import annotations

import errno
import logging
import os

import pytest
from pydantic import ValidationError

from tasks.config import StorageConfig, resolve_storage
from tasks.storage import Store


class Interrupted(Exception):
    pass


def _interrupted_write(store: Store, key: str) -> None:
    with pytest.raises(Interrupted), store.open_atomic(key) as f:
        f.write(b"x" * (1 << 20))
        raise Interrupted


def test_interrupted_local_write_leaves_nothing(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    _interrupted_write(store, "a/b.tar")
    assert not store.exists("a/b.tar")
    assert [p.name for p in (tmp_path / "a").iterdir()] == []  # no temporary file left behind


def test_interrupted_overwrite_keeps_the_old_object(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    store.write_bytes("k.json", b"old")
    _interrupted_write(store, "k.json")
    assert store.read_bytes("k.json") == b"old"


def test_relative_root_is_resolved_for_other_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = resolve_storage(StorageConfig(root="./artifacts"))
    assert resolved.root == str(tmp_path / "artifacts")
    with pytest.raises(ValueError, match="not resolved"):
        Store(StorageConfig(root="./artifacts"))


@pytest.mark.parametrize("name", ["with space", "hash#tag", "what?", "100%", "file:%20x"])
def test_local_roots_are_taken_literally(tmp_path, name):
    root = tmp_path / name / "store"
    store = Store(resolve_storage(StorageConfig(root=str(root))))
    store.write_text("runs/a/config.json", "{}")
    assert (root / "runs" / "a" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nowhere else
    assert store.list("runs/a") == ["runs/a/config.json"]
    # a file:// URL is a plain path too: no percent-decoding
    via_url = Store(resolve_storage(StorageConfig(root=f"file://{root}")))
    assert via_url.read_bytes("runs/a/config.json") == b"{}"


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "a//b", "./a", "a/./b"])
def test_keys_cannot_leave_the_root(tmp_path, key):
    store = Store(StorageConfig(root=str(tmp_path / "root")))
    with pytest.raises(ValueError, match="not a plain path below the storage root"):
        store.write_bytes(key, b"x")
    with pytest.raises(ValueError, match="not a plain path below the storage root"):
        store.read_bytes(key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_a_local_store_does_not_retry(tmp_path, caplog):
    """Waiting does not mend a local filesystem's errors: they surface at once, as the OS says."""
    store = Store(StorageConfig(root=str(tmp_path)))
    os.symlink("loop", tmp_path / "loop")  # the OS refuses it with ELOOP: waiting will not help
    caplog.set_level(logging.WARNING, logger="tasks.retry")
    with pytest.raises(OSError) as err:
        store.read_bytes("loop")
    assert err.value.errno == errno.ELOOP
    retries = [r for r in caplog.records if r.name == "tasks.retry"]
    assert not retries  # not one: the first would say "... failed (...); retrying for up to ..."


def test_the_retry_budget_is_validated_and_round_trips():
    assert StorageConfig().retry_budget_s == 120.0
    cfg = StorageConfig(root="s3://b/p", retry_budget_s=7.5)
    assert StorageConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ValidationError, match="retry_budget_s"):
        StorageConfig(retry_budget_s=-1)
