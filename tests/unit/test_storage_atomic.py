"""An interrupted write leaves no partial object visible (local directory; S3 in integration)."""

from __future__ import annotations

import pytest

from tasks.config import StorageConfig
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
    store = Store(StorageConfig(root="./artifacts"))
    assert store.config.root == (tmp_path / "artifacts").as_uri()
