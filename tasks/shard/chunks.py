"""The shard stage's pure rules: which split an image is in, where a chunk ends, and the names
(hashes) of chunks, shard sets and their content. No I/O and no Ray: a test needs neither a store
nor a cluster to check them, and the driver and the shard tasks agree because they share them.

- **Split by key.** An image is in the holdout split iff a hash of (seed, its key) falls below
  `holdout_fraction`: adding files never moves an image between splits.
- **Content-defined chunks.** Within a split, in listing order, a chunk ends after an image whose
  key hashes to a boundary (at least `samples_per_shard/2` images per chunk, at most 4x the mean).
  A boundary depends on its own key only, so new or changed files change only the chunks they
  fall into; the chunks around them keep their boundaries and their shards. (Hashing keys into a
  fixed number of buckets would spread a night's new files over every bucket; fixed-size chunks
  would shift every boundary after the first insertion.)
- **Shards named by their chunk.** A chunk's id hashes its images' keys, labels, sizes and
  versions plus the settings; the shard's key carries it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tasks import layout
from tasks.config import DataConfig
from tasks.records import SkippedFile, SplitInfo
from tasks.shard.sources import Item

FORMAT = "dataset@2"  # part of every shard set's identity: a new record format, new shards


def _h64(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest(), "big")


def split_of(key: str, holdout_fraction: float, seed: int) -> layout.Split:
    """The split of the image `key`: a function of the key alone, so it never moves."""
    return "holdout" if _h64(f"split-{seed}", key) < holdout_fraction * 2.0**64 else "train"


class ChunkCutter:
    """Content-defined chunk boundaries over a stream of items: a chunk ends after an item whose
    key hashes to 0 mod `avg` once it holds `min_len` items, or when it reaches `max_len`."""

    def __init__(self, samples_per_shard: int):
        self.min_len = max(1, samples_per_shard // 2)
        self.avg = max(1, samples_per_shard - self.min_len)  # mean length ~ min_len + avg
        self.max_len = 4 * samples_per_shard
        self.items: list[Item] = []

    def add(self, item: Item) -> list[Item] | None:
        """Append `item`; returns the finished chunk when `item` ends one."""
        self.items.append(item)
        n = len(self.items)
        if n >= self.max_len or (n >= self.min_len and _h64("cut", item.key) % self.avg == 0):
            chunk, self.items = self.items, []
            return chunk
        return None


@dataclass(frozen=True)
class Chunk:
    """A run of one split's images, in listing order, that becomes one shard."""

    split: layout.Split
    items: tuple[Item, ...]
    positions: tuple[int, ...]  # each item's place in the whole listing (0-based)


def cut_chunks(
    items: Iterable[Item], samples_per_shard: int, holdout_fraction: float, seed: int
) -> Iterator[Chunk]:
    """The chunks of a listing, each as soon as it ends (a split's last, after the listing)."""
    cutters = {s: ChunkCutter(samples_per_shard) for s in layout.SPLITS}
    positions: dict[layout.Split, list[int]] = {s: [] for s in layout.SPLITS}
    for n, item in enumerate(items):
        split = split_of(item.key, holdout_fraction, seed)
        positions[split].append(n)
        chunk = cutters[split].add(item)
        if chunk is not None:
            yield Chunk(split, tuple(chunk), tuple(positions[split]))
            positions[split] = []
    for split, cutter in cutters.items():
        if cutter.items:
            yield Chunk(split, tuple(cutter.items), tuple(positions[split]))


def item_line(item: Item) -> bytes:
    """What identifies an image's content in a hash: its key, label, size and version."""
    return f"{item.key}\0{item.label}\0{item.size}\0{item.version}\n".encode()


def chunk_id(shard_set: str, split: layout.Split, items: Iterable[Item]) -> str:
    """sha256 of the settings and of every image's key, label, size and version."""
    h = hashlib.sha256(f"{shard_set}|{split}|".encode())
    for it in items:
        h.update(item_line(it))
    return h.hexdigest()


def shard_set_id(source: str, channels: int, cfg: DataConfig) -> str:
    """A shard set's identity: the source and every setting that shapes a shard's bytes."""
    settings = (
        f"{FORMAT}|{source}|size={cfg.image_size}|channels={channels}|"
        f"holdout={cfg.holdout_fraction}|seed={cfg.seed}|per_shard={cfg.samples_per_shard}"
    )
    return hashlib.sha256(settings.encode()).hexdigest()


def fingerprint(
    shard_set: str, splits: dict[layout.Split, SplitInfo], skipped: Iterable[SkippedFile]
) -> str:
    """The set's content: every shard's chunk and sha256, and the chunks left empty."""
    h = hashlib.sha256(f"{shard_set}|".encode())
    for name, split in splits.items():
        for s in split.shards:
            h.update(f"{name}\0{s.chunk}\0{s.sha256}\n".encode())
    for skip in skipped:
        h.update(f"skipped\0{skip.path}\0{skip.chunk}\n".encode())
    return h.hexdigest()


def sample_key(key: str) -> str:
    """A webdataset `__key__` for an image key: '.' starts a member's extension in a tar, so it
    (and '%', to stay one-to-one) is percent-encoded: 'cats/1.png' -> 'cats/1%2Epng'."""
    return key.replace("%", "%25").replace(".", "%2E")
