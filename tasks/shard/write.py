"""One chunk -> one shard: the body of a shard task (a Ray task, or a call in the driver).

It reads, decodes, checks and resizes its chunk's images one at a time and streams them into the
shard's tar, written atomically; or it keeps the shard an earlier run wrote for the same chunk
when its bytes still match their sha256. Bytes depend on the chunk only (fixed tar mtime, fixed
order): the same whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np

from tasks import layout
from tasks.config import StorageConfig
from tasks.records import ShardInfo, SkippedFile
from tasks.shard.chunks import sample_key
from tasks.shard.sources import (
    BadImageError,
    FileSource,
    Item,
    iter_image_bytes,
    prepare_image,
    source_url,
)
from tasks.storage import open_store
from tasks.usage import reported
from tasks.webdata import RawSample, encode_png, write_shard


@dataclass(frozen=True)
class ShardSettings:
    """What every shard task of one run needs besides its chunk."""

    storage: StorageConfig  # where the shards go
    source: FileSource | None  # where the images are read (None: pixels travel in the job)
    channels: int
    image_size: int | None
    on_bad_file: Literal["fail", "skip"]


@dataclass(frozen=True)
class ChunkJob:
    seq: int  # its place in the listing order
    split: layout.Split
    chunk: str
    key: str  # the shard's store key
    items: tuple[Item, ...]
    pixels: np.ndarray | None = None  # in-memory datasets: uint8 [n, C, H, W] of `items`
    previous: ShardInfo | None = None  # the shard an earlier run wrote for this chunk


@dataclass(frozen=True)
class ChunkResult:
    shard: ShardInfo | None  # None: every image of the chunk was skipped
    skipped: tuple[SkippedFile, ...]
    image_size: int | None  # side length of the images written (None when kept or empty)
    kept: bool  # the earlier shard was intact and kept
    damaged: bool  # an earlier shard was missing or did not match its sha256


def _samples(
    settings: ShardSettings, job: ChunkJob, skipped: list[SkippedFile], sizes: set[int]
) -> Iterator[RawSample]:
    """The chunk's samples, read and checked one at a time; bad ones are skipped or raised."""
    if job.pixels is not None:
        for item, pixels in zip(job.items, job.pixels, strict=True):
            sizes.add(int(pixels.shape[-1]))
            png = encode_png(pixels.transpose(1, 2, 0))
            yield {"__key__": item.key, "png": png, "cls": item.label}
        return
    assert settings.source is not None
    contents = iter_image_bytes(settings.source, [item.key for item in job.items])
    for item, data in zip(job.items, contents, strict=True):
        try:
            if isinstance(data, FileNotFoundError):
                raise data
            png, size = prepare_image(data, settings.channels, settings.image_size)
        except (BadImageError, FileNotFoundError) as err:
            reason = str(err) if isinstance(err, BadImageError) else "vanished after the listing"
            if settings.on_bad_file == "fail":
                url = source_url(settings.source, item.key)
                raise BadImageError(
                    f"image {url} {reason}; fix or remove the file, or set data.on_bad_file=skip "
                    "to leave bad files out (they are listed in the manifest)"
                ) from None
            skipped.append(SkippedFile(path=item.key, reason=reason, chunk=job.chunk))
            continue
        sizes.add(size)
        yield {"__key__": sample_key(item.key), "png": png, "cls": item.label}


@reported
def write_chunk(settings: ShardSettings, job: ChunkJob) -> ChunkResult:
    """One chunk -> one shard (atomically, streaming: one image in memory at a time), or the
    earlier shard of the same chunk when its bytes still match their sha256."""
    store = open_store(settings.storage)
    damaged = False
    if job.previous is not None:
        try:
            damaged = store.sha256(job.previous.key) != job.previous.sha256
        except FileNotFoundError:
            damaged = True
        if not damaged:
            return ChunkResult(job.previous, (), None, kept=True, damaged=False)
    skipped: list[SkippedFile] = []
    sizes: set[int] = set()
    samples = _samples(settings, job, skipped, sizes)
    first = next(samples, None)
    if first is None:  # nothing to write: no empty shard (an empty rank would hang training)
        return ChunkResult(None, tuple(skipped), None, kept=False, damaged=damaged)
    info = write_shard(store, job.key, chain([first], samples))
    if len(sizes) > 1:
        raise ValueError(
            f"the images of shard {store.url(job.key)} have several sizes {sorted(sizes)}; "
            "set data.image_size to resize every image"
        )
    info = info.model_copy(update={"chunk": job.chunk})
    return ChunkResult(info, tuple(skipped), sizes.pop(), kept=False, damaged=damaged)
