"""Arrays cached in the store as .npz: the one writer and reader of the shards' features and of
the reference statistics, so that a damaged cache is told apart from a missing one the same way
everywhere.

An object holds named arrays and a JSON `meta` (what they were computed from: shard or dataset
fingerprint, extractor sha256, count), which the caller compares with what it wants. The zip's
CRC-32 of each member catches damaged bytes as they are read.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from tasks.storage import Store


class DamagedCacheError(ValueError):
    """A cached .npz whose bytes do not read back: damaged or truncated. Recompute it."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class CachedArrays:
    arrays: dict[str, np.ndarray]
    meta: dict[str, object]


def write_npz(
    store: Store, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, object]
) -> None:
    """Store `arrays` and their `meta` (JSON-able) at `key`, atomically (`Store.write_bytes`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays, meta=np.array(json.dumps(meta)))  # type: ignore[arg-type]  # numpy's stub: **kwds are arrays
    store.write_bytes(key, buf.getvalue())


def read_npz(store: Store, key: str, names: Iterable[str]) -> CachedArrays:
    """The arrays `names` and the meta at `key`. A missing object raises FileNotFoundError (and the
    store's own errors pass through); bytes that do not read back raise `DamagedCacheError`
    naming the object."""
    data = store.read_bytes(key)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {name: npz[name] for name in names}  # reading a member checks its CRC-32
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise DamagedCacheError(
            f"cached arrays {store.url(key)} are damaged ({type(err).__name__}: {err})", key
        ) from None
    if not isinstance(meta, dict):
        raise DamagedCacheError(f"cached arrays {store.url(key)} have no meta record", key)
    return CachedArrays(arrays, meta)
