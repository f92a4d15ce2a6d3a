"""Shard stage: a dataset becomes WebDataset tars for a train and a held-out split, plus a manifest.

    datasets/<name>-<set12>/{train,holdout}-<chunk16>.tar ... manifest.json

The driver streams the source's listing (keys, sizes, etags or mtimes; never pixels of a file
source) and cuts it into chunks (`tasks.shard.chunks`: split by key, content-defined boundaries,
shards named by their chunk); each chunk becomes one shard, written by a Ray task (or in this
process) that reads, checks and encodes its images (`tasks.shard.write`). The manifest is written
last, so its presence means a complete set. A rerun re-verifies (sha256) and keeps the shard of
every chunk seen before, and writes only new or changed chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice

import numpy as np

from tasks import layout
from tasks.config import DataConfig, RayConfig
from tasks.jobs import Progress
from tasks.records import (
    DatasetManifest,
    RecordFormatError,
    ShardInfo,
    ShardResult,
    SkippedFile,
    SplitInfo,
)
from tasks.shard.chunks import Chunk, chunk_id, cut_chunks, fingerprint, item_line, shard_set_id
from tasks.shard.datasets import load_source
from tasks.shard.sources import FileSource, Item, Listing, file_source
from tasks.shard.write import ChunkJob, ChunkResult, ShardSettings, write_chunk
from tasks.storage import Store

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0

Runner = Callable[[Iterator[ChunkJob]], Iterator[tuple[ChunkJob, ChunkResult]]]


def _in_process(settings: ShardSettings) -> Runner:
    def run(jobs: Iterator[ChunkJob]) -> Iterator[tuple[ChunkJob, ChunkResult]]:
        for job in jobs:
            yield job, write_chunk(settings, job)

    return run


def _on_ray(settings: ShardSettings, workers: int) -> Runner:
    """At most `workers` shard tasks at once (1 CPU each); results in completion order. Ray
    re-runs a task whose process died (max_retries); an error in a task is not retried."""
    import ray

    remote = ray.remote(write_chunk).options(num_cpus=1, max_retries=3, retry_exceptions=False)
    settings_ref = ray.put(settings)

    def run(jobs: Iterator[ChunkJob]) -> Iterator[tuple[ChunkJob, ChunkResult]]:
        running: dict[ray.ObjectRef[ChunkResult], ChunkJob] = {}
        pending = iter(jobs)
        try:
            while True:
                while len(running) < workers and (job := next(pending, None)) is not None:
                    running[remote.remote(settings_ref, job)] = job
                if not running:
                    return
                ready, _ = ray.wait(list(running), num_returns=1)
                job = running.pop(ready[0])
                try:
                    result: ChunkResult = ray.get(ready[0])
                except ray.exceptions.RayTaskError as err:
                    if isinstance(err.cause, Exception):  # the task's own error, unwrapped
                        raise err.cause from None
                    raise
                yield job, result
        finally:
            for ref in running:
                ray.cancel(ref)

    return run


def _workers(cfg: DataConfig, ray_cfg: RayConfig | None, file_source: bool) -> int:
    if cfg.workers is not None:
        requested = cfg.workers
    elif not file_source:
        return 0
    else:
        requested = -1  # every CPU of the cluster
    if requested == 0:
        return 0
    from tasks.ray_runtime import check_resources, ensure_ray

    ray_cfg = ray_cfg or RayConfig()
    ensure_ray(ray_cfg)
    import ray

    if requested < 0:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    check_resources(ray_cfg, {"CPU": 1.0}, 1, "a shard task")
    return requested


@dataclass
class _Plan:
    """What the driver streams: the items in order, and for in-memory sources their pixels."""

    name: str
    source: str
    items: Iterator[Item]
    class_names: Callable[[], list[str]]
    listing: Listing | None
    channels: int
    image_size: int | None  # None: learnt from the images
    pixels: np.ndarray | None  # in-memory sources: uint8 [N, C, H, W] in item order
    file_source: FileSource | None

    @property
    def count(self) -> int | None:
        """The number of images when known before listing (in-memory sources)."""
        return len(self.pixels) if self.pixels is not None else None


def _plan(cfg: DataConfig, store: Store) -> _Plan:
    if cfg.dataset.startswith("imagefolder:"):
        src = file_source(cfg.dataset.split(":", 1)[1], store.config)
        listing = Listing(src, cfg.on_empty_class)
        return _Plan(
            src.name,
            src.url,
            islice(iter(listing), cfg.max_images),
            lambda: listing.class_names,
            listing,
            cfg.channels or 3,
            cfg.image_size,
            None,
            src,
        )
    arr = load_source(cfg)  # bounded, in memory (and capped at max_images)
    items = (
        Item(
            f"{i:08d}",
            int(label),
            0,
            hashlib.blake2b(arr.images[i].tobytes(), digest_size=16).hexdigest(),
        )
        for i, label in enumerate(arr.labels)
    )
    name = arr.name
    source = name if cfg.root is None else f"{name}:{cfg.source_split}"
    return _Plan(
        name,
        source,
        items,
        lambda: arr.class_names,
        None,
        int(arr.images.shape[1]),
        int(arr.images.shape[-1]),
        arr.images,
        None,
    )


@dataclass(frozen=True)
class _Target:
    """The shard set this run writes (its identity and folder) and what an earlier run of it
    left there: its manifest, its shards and its skipped files, by chunk."""

    shard_set: str
    prefix: str
    previous: DatasetManifest | None
    shards: dict[str, ShardInfo]
    skips: dict[str | None, list[SkippedFile]]

    @classmethod
    def of(cls, plan: _Plan, cfg: DataConfig, store: Store) -> _Target:
        shard_set = shard_set_id(plan.source, plan.channels, cfg)
        prefix = layout.dataset_prefix(plan.name, shard_set)
        key = layout.dataset_manifest(prefix)
        try:
            previous = DatasetManifest.read_or_none(store, key)
        except RecordFormatError as err:
            log.warning("not reusing the shards of %s: %s", store.url(key), err)
            previous = None
        shards: dict[str, ShardInfo] = {}
        skips: dict[str | None, list[SkippedFile]] = {}
        if previous is not None:
            shards = {s.chunk: s for sp in previous.splits.values() for s in sp.shards if s.chunk}
            for skip in previous.skipped:
                skips.setdefault(skip.chunk, []).append(skip)
        return cls(shard_set, prefix, previous, shards, skips)


class _Listed:
    """What the driver learns from the listing as it streams past."""

    def __init__(self, source: str) -> None:
        self.hash = hashlib.sha256(f"{source}|".encode())  # the manifest's source_fingerprint
        self.per_label: Counter[int] = Counter()
        self.count = 0

    def add(self, item: Item) -> None:
        self.hash.update(item_line(item))
        self.per_label[item.label] += 1
        self.count += 1


_Finished = tuple[int, ShardInfo | None, tuple[SkippedFile, ...]]  # seq, shard, skipped files


@dataclass
class _Ledger:
    """What the driver keeps of each finished chunk (its items are dropped), and the tallies the
    manifest needs. Chunks finish in any order; `seq` restores the listing's."""

    chunks: dict[layout.Split, list[_Finished]] = field(
        default_factory=lambda: {s: [] for s in layout.SPLITS}
    )
    unusable: Counter[int] = field(default_factory=Counter)  # per label: images skipped as bad
    sizes: set[int] = field(default_factory=set)  # side lengths of the images written
    written: int = 0
    kept: int = 0

    def record(
        self,
        seq: int,
        split: layout.Split,
        items: tuple[Item, ...],
        shard: ShardInfo | None,
        skipped: tuple[SkippedFile, ...],
    ) -> None:
        if skipped:
            bad = {s.path for s in skipped}
            self.unusable.update(it.label for it in items if it.key in bad)
        self.chunks[split].append((seq, shard, skipped))

    def in_order(self, split: layout.Split) -> list[_Finished]:
        return sorted(self.chunks[split], key=lambda c: c[0])

    def skipped(self) -> list[SkippedFile]:
        return [s for sp in layout.SPLITS for _, _, sk in self.in_order(sp) for s in sk]


def _count_beside(progress: Progress, source: FileSource, limit: int | None) -> threading.Timer:
    """Count the listing's names for the progress' total, in a thread that starts only once the
    job has run for half a progress interval: a short job (the common nightly rerun) never lists
    its source twice. Listing is much faster than sharding, so the count arrives early."""

    def count() -> None:
        with contextlib.suppress(Exception):  # the listing itself reports what went wrong
            n = sum(1 for _ in islice(Listing(source, "skip"), limit))  # names only
            if progress.total is None:  # not once the listing ended: it knows better
                progress.total = n

    timer = threading.Timer(PROGRESS_EVERY_S / 2, count)
    timer.name, timer.daemon = "shard-count", True
    timer.start()
    return timer


def _tally(
    items: Iterator[Item], listed: _Listed, progress: Progress, counter: threading.Timer | None
) -> Iterator[Item]:
    """`items`, noted on their way to the chunk cutter; once the listing ends its count is the
    progress' total, and a count beside it is no longer needed."""
    try:
        for item in items:
            listed.add(item)
            progress.listed += 1
            yield item
    finally:
        if counter is not None:
            counter.cancel()
    progress.total = progress.listed


def _jobs(
    chunks: Iterator[Chunk],
    target: _Target,
    pixels: np.ndarray | None,
    ledger: _Ledger,
    progress: Progress,
) -> Iterator[ChunkJob]:
    """A job per chunk, except a chunk every image of which an earlier run skipped as bad: it is
    recorded as such here, as reading it again would skip the same files again."""
    for seq, chunk in enumerate(chunks, start=1):
        cid = chunk_id(target.shard_set, chunk.split, chunk.items)
        if cid in target.skips and cid not in target.shards:
            ledger.record(seq, chunk.split, chunk.items, None, tuple(target.skips[cid]))
            progress.skip(len(chunk.items))
            continue
        yield ChunkJob(
            seq,
            chunk.split,
            cid,
            layout.dataset_shard(target.prefix, chunk.split, cid),
            chunk.items,
            pixels[list(chunk.positions)] if pixels is not None else None,
            target.shards.get(cid),
        )


def _finish(
    job: ChunkJob,
    result: ChunkResult,
    target: _Target,
    ledger: _Ledger,
    progress: Progress,
    store: Store,
) -> None:
    """Note a finished shard task; a kept shard's skipped files are the earlier run's."""
    if result.damaged:
        log.warning(
            "shard %s was missing or did not match the manifest's sha256: rewritten from "
            "the source",
            store.url(job.key),
        )
    skipped = tuple(target.skips.get(job.chunk, ())) if result.kept else result.skipped
    ledger.kept += result.kept
    ledger.written += result.shard is not None and not result.kept
    if result.image_size is not None:
        ledger.sizes.add(result.image_size)
    ledger.record(job.seq, job.split, job.items, result.shard, skipped)
    if result.kept:
        progress.skip(len(job.items))
    else:
        progress.update(len(job.items))


def shard_dataset(cfg: DataConfig, store: Store, ray_cfg: RayConfig | None = None) -> ShardResult:
    """Shard `cfg.dataset` into `store`, keeping the shards of chunks an earlier run wrote (after
    re-verifying their sha256); the manifest is written last. Returns the earlier manifest itself
    (`reused`) when nothing changed."""
    plan = _plan(cfg, store)
    target = _Target.of(plan, cfg, store)
    settings = ShardSettings(
        store.config, plan.file_source, plan.channels, plan.image_size, cfg.on_bad_file
    )
    workers = _workers(cfg, ray_cfg, plan.file_source is not None)
    run = _on_ray(settings, workers) if workers else _in_process(settings)
    progress = Progress("shard", plan.count, every_s=PROGRESS_EVERY_S)
    counter = None
    if plan.file_source is not None:
        counter = _count_beside(progress, plan.file_source, cfg.max_images)
    listed, ledger = _Listed(plan.source), _Ledger()
    try:
        items = _tally(plan.items, listed, progress, counter)
        chunks = cut_chunks(items, cfg.samples_per_shard, cfg.holdout_fraction, cfg.seed)
        for job, result in run(_jobs(chunks, target, plan.pixels, ledger, progress)):
            _finish(job, result, target, ledger, progress, store)
    finally:
        if counter is not None:
            counter.cancel()
    return _conclude(cfg, store, plan, target, listed, ledger)


def _conclude(
    cfg: DataConfig, store: Store, plan: _Plan, target: _Target, listed: _Listed, ledger: _Ledger
) -> ShardResult:
    """Check the set and write its manifest, or return the earlier one when nothing changed."""
    class_names = plan.class_names()
    splits = {s: _split_info(ledger, s, listed.count, cfg) for s in layout.SPLITS}
    image_size = _image_size(plan, ledger.sizes, target.previous)
    empty = [class_names[i] for i, n in listed.per_label.items() if n == ledger.unusable[i]]
    if empty:
        raise ValueError(
            f"class(es) {empty} of {plan.source} have no usable image (all skipped as bad "
            "files); fix the files or remove the class folder(s)"
        )
    skipped = (plan.listing.skipped if plan.listing is not None else []) + ledger.skipped()
    content = fingerprint(target.shard_set, splits, skipped)
    previous = target.previous
    if previous is not None and previous.fingerprint == content and ledger.written == 0:
        log.info("reusing shards of %s (fingerprint %s)", store.url(target.prefix), content[:12])
        return ShardResult(manifest=previous, reused=True, kept=ledger.kept)

    manifest = DatasetManifest(
        dataset=plan.name,
        source=plan.source,
        shard_set=target.shard_set,
        fingerprint=content,
        source_fingerprint=listed.hash.hexdigest(),
        image_size=image_size,
        channels=plan.channels,
        num_classes=len(class_names),
        class_names=class_names,
        splits=splits,
        skipped=skipped,
        config=cfg,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest.write(store, layout.dataset_manifest(target.prefix))
    if plan.listing is not None and plan.listing.ignored:
        log.info("ignored %d file(s) that are not images", plan.listing.ignored)
    log.info(
        "sharded %s: %d train / %d holdout images, %d skipped; %d shard(s) written, %d kept -> %s",
        plan.name,
        splits["train"].count,
        splits["holdout"].count,
        len(skipped),
        ledger.written,
        ledger.kept,
        store.url(target.prefix),
    )
    return ShardResult(manifest=manifest, reused=False, written=ledger.written, kept=ledger.kept)


def _split_info(ledger: _Ledger, split: layout.Split, n_images: int, cfg: DataConfig) -> SplitInfo:
    shards = [shard for _, shard, _ in ledger.in_order(split) if shard is not None]
    count = sum(s.count for s in shards)
    if count == 0:
        raise ValueError(
            f"the {split} split is empty: {n_images} image(s) listed, data.holdout_fraction="
            f"{cfg.holdout_fraction} (each image's split is a hash of its key); add images or "
            "change data.holdout_fraction"
        )
    return SplitInfo(count=count, shards=shards)


def _image_size(plan: _Plan, sizes: set[int], previous: DatasetManifest | None) -> int:
    if plan.image_size is not None:
        return plan.image_size
    if previous is not None and (not sizes or sizes == {previous.image_size}):
        return previous.image_size
    if len(sizes) != 1:
        raise ValueError(
            f"the images of {plan.source} have several sizes {sorted(sizes)}; set data.image_size "
            "to resize every image"
        )
    return sizes.pop()
