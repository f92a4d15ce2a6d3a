"""Where the tests and the benchmarks find the repository and the shared test data, and a reader
for the data's MNIST files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
# The shared test data (`../shared/data`, MNIST under `mnist/`); DIFFPIPE_TEST_DATA names another
# folder of the same layout.
SHARED_DATA = Path(os.environ.get("DIFFPIPE_TEST_DATA", REPO.parent / "shared" / "data"))
MNIST = SHARED_DATA / "mnist"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format, gzipped) as an array of its own shape:
    [10000, 28, 28] for t10k-images-idx3-ubyte.gz, [10000] for the labels."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)
