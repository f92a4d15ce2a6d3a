"""The data path of one DDP rank: its shards, a seeded shuffle, decoding, flips and batching.

Decoding, augmentation and batching run off the training thread, in `train.loader_processes`
background processes (a torch DataLoader over `RankBatches`, an IterableDataset); the training
loop only takes finished uint8 batches and copies them to its device (pinned memory and
non-blocking copies on a GPU).

Batch i of a rank is a function of (seed, rank, start step + i) alone, whatever the number of
data workers, so a resume is exact: every data worker reads the rank's raw sample stream (bytes
only; cheap) and decodes only its own share of the batches (worker w of k: batches w, w + k, ...),
and the DataLoader takes batches from its workers in turn, so they arrive in order.
"""

from __future__ import annotations

import random
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from itertools import count, islice

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tasks.config import StorageConfig
from tasks.records import ShardInfo
from tasks.storage import Store, open_store
from tasks.webdata import RawSample, decode_sample, iter_raw_samples

Batch = tuple[torch.Tensor, torch.Tensor]  # images uint8 [B, C, H, W], labels int64 [B]
_HFLIP_STREAM = 0x68666C70  # "hflp": keeps the flip draws apart from every other seeded stream


def shards_for_rank(
    shards: list[ShardInfo], rank: int, world_size: int, epoch: int, seed: int
) -> list[ShardInfo]:
    """This rank's shards for one epoch: a seeded shuffle dealt round-robin.

    With fewer shards than ranks, ranks share shards (rank r reads shard r mod n), so no rank is
    ever left without data: an empty rank would hang DDP's all-reduce (webdataset #188).
    """
    if not shards:
        raise ValueError("the train split has no shards")
    order = list(shards)
    random.Random(f"{seed}-{epoch}").shuffle(order)
    if len(order) >= world_size:
        return order[rank::world_size]
    return [order[rank % len(order)]]


def stream_samples(
    store: Store,
    shards: list[ShardInfo],
    rank: int,
    world_size: int,
    *,
    seed: int,
    shuffle_buffer: int,
    skip: int = 0,
) -> Iterator[RawSample]:
    """Endless raw samples for one rank, shuffled with a per-(epoch, rank) seed; the first `skip`
    are dropped.

    Whole epochs are skipped from the manifest's counts without reading; inside an epoch the skipped
    samples are read but not decoded.
    """
    for epoch in count():
        mine = shards_for_rank(shards, rank, world_size, epoch, seed)
        epoch_len = sum(s.count for s in mine)
        if skip >= epoch_len:
            skip -= epoch_len
            continue
        rng = random.Random(f"{seed}-{epoch}-{rank}")
        yield from islice(
            _shuffled(iter_raw_samples(store, [s.key for s in mine]), rng, shuffle_buffer),
            skip,
            None,
        )
        skip = 0


def _shuffled(samples: Iterator[RawSample], rng: random.Random, buffer: int) -> Iterator[RawSample]:
    """Buffered shuffle (webdataset's approach, with our seeded rng so a resume replays it exactly)."""
    buf: list[RawSample] = []
    for sample in samples:
        if len(buf) < buffer:
            buf.append(sample)
            continue
        j = rng.randrange(len(buf))
        buf[j], sample = sample, buf[j]
        yield sample
    rng.shuffle(buf)
    yield from buf


def hflip_mask(seed: int, rank: int, step: int, batch_size: int) -> np.ndarray:
    """Which images of a rank's batch for `step` are flipped left-right: bool [B], p = 1/2."""
    rng = np.random.default_rng([seed, rank, step, _HFLIP_STREAM])
    return rng.random(batch_size) < 0.5


def decode_batch(samples: list[RawSample], channels: int, flip: np.ndarray | None = None) -> Batch:
    """Raw samples -> (images uint8 [B, C, H, W], labels int64 [B]; 0 where a sample has none),
    the images where `flip` (bool [B]) is set mirrored left-right."""
    decoded = [decode_sample(s, channels) for s in samples]
    images = np.stack([d.image for d in decoded])
    if flip is not None and flip.any():
        images[flip] = images[flip][..., ::-1]
    labels = [d.label if d.label is not None else 0 for d in decoded]
    return torch.from_numpy(images), torch.tensor(labels, dtype=torch.long)


@dataclass(frozen=True)
class RankBatches(IterableDataset[Batch]):
    """The endless batches of one rank from `start_step` on (picklable: a data worker opens its
    own store connection)."""

    storage: StorageConfig
    shards: list[ShardInfo]
    rank: int
    world_size: int
    seed: int
    shuffle_buffer: int
    batch_size: int
    channels: int
    start_step: int = 0
    hflip: bool = False

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = stream_samples(
            open_store(self.storage) if info is None else _store_after_fork(self.storage),
            self.shards,
            self.rank,
            self.world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            skip=self.start_step * self.batch_size,
        )
        for i in count():
            raw = list(islice(samples, self.batch_size))  # read by every worker, decoded by one
            if i % workers != worker:
                continue
            step = self.start_step + i
            flip = hflip_mask(self.seed, self.rank, step, self.batch_size) if self.hflip else None
            yield decode_batch(raw, self.channels, flip)


def _store_after_fork(cfg: StorageConfig) -> Store:
    """A store of this data worker's own: the connections (and s3fs's event loop) of the one it
    was forked with belong to the training process, and s3fs refuses to run them here."""
    if not cfg.is_local:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
    return Store(cfg)


def load_batches(
    dataset: RankBatches, workers: int, device: torch.device
) -> Generator[Batch, None, None]:
    """The dataset's batches, decoded by `workers` background processes (0: on this thread), in
    pinned memory when `device` is a GPU. Closing the iterator stops the workers."""
    if workers == 0:
        yield from dataset
        return
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4,
        # The loader draws its workers' base seed from this, not from the global RNG the training
        # step seeds (our dataset draws nothing from torch's RNG).
        generator=torch.Generator().manual_seed(dataset.seed),
    )
    batches = iter(loader)
    try:
        yield from batches
    finally:
        del batches  # shuts the worker processes down now, not at garbage collection


def to_device(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) -> (x0 float32 [B, C, H, W] in [-1, 1], labels int64 [B]) on
    `device`; the copy is asynchronous from pinned memory."""
    images, labels = batch
    non_blocking = device.type == "cuda"
    x0 = images.to(device, non_blocking=non_blocking).to(torch.float32) / 127.5 - 1.0
    return x0, labels.to(device, non_blocking=non_blocking)
