"""Tiny image folders for the shard stage's tests: one subfolder per class, PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: Path, rng: np.random.Generator, size: int = 8, channels: int = 3) -> None:
    shape = (size, size, channels) if channels == 3 else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def make_folder(
    root: Path,
    per_class: int,
    classes: tuple[str, ...] = ("cats", "dogs"),
    seed: int = 0,
    **kw: int,
) -> list[Path]:
    """`per_class` random PNGs in `root/<class>/`, named 0000.png ...; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for cls in classes:
        for i in range(per_class):
            paths.append(root / cls / f"{i:04d}.png")
            write_png(paths[-1], rng, **kw)
    return paths
