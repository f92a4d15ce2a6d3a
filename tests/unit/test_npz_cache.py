"""The store's .npz cache (features, reference statistics): what is written reads back; a damaged
object raises one error that names it, and a missing one stays a FileNotFoundError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.config import StorageConfig
from tasks.npz import DamagedCacheError, read_npz, write_npz
from tasks.storage import Store

KEY = "stats/fp/0123456789abcdef-n24.npz"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(StorageConfig(root=str(tmp_path)))


def _write(store: Store) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"features": rng.random((24, 64), np.float32), "mu": rng.random(64)}
    write_npz(store, KEY, arrays, {"count": 24, "extractor_sha256": "ab" * 32})
    return arrays


def test_round_trip(store: Store) -> None:
    arrays = _write(store)
    cached = read_npz(store, KEY, ("features", "mu"))
    assert cached.meta == {"count": 24, "extractor_sha256": "ab" * 32}
    for name, value in arrays.items():
        np.testing.assert_array_equal(cached.arrays[name], value)
        assert cached.arrays[name].dtype == value.dtype


@pytest.mark.parametrize("where", ["array data", "meta", "truncated"])
def test_damaged_bytes_raise_an_error_naming_the_object(store: Store, where: str) -> None:
    _write(store)
    data = bytearray(store.read_bytes(KEY))
    if where == "truncated":
        data = data[: len(data) // 2]
    else:
        at = (
            len(data) // 3
            if where == "array data"
            else data.rindex("extractor_sha256".encode("utf-32-le"))
        )
        data[at] ^= 0x01  # one flipped bit
    store.write_bytes(KEY, bytes(data))
    with pytest.raises(DamagedCacheError, match="damaged") as err:
        read_npz(store, KEY, ("features", "mu"))
    assert err.value.key == KEY and store.url(KEY) in str(err.value)


def test_missing_object_is_not_damaged(store: Store) -> None:
    with pytest.raises(FileNotFoundError):
        read_npz(store, KEY, ("features",))
