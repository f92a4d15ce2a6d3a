"""An interrupted write leaves no partial object visible (local directory; S3 in integration)."""

from __future__ import annotations

import pytest

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
