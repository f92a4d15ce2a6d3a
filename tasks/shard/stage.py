"""Shard stage: a dataset becomes WebDataset tars for a train and a held-out split, plus a manifest.

    datasets/<name>-<set12>/{train,holdout}-<chunk16>.tar ... manifest.json

The driver streams the source's listing (keys, sizes, etags or mtimes; never pixels of a file
source) and cuts it into chunks; each chunk becomes one shard, written by a Ray task (or in this
process) that reads, checks and encodes its images. The manifest is written last, so its presence
means a complete set. Three choices make reruns cheap and results exact:

- **Split by key.** An image is in the holdout split iff a hash of (seed, its key) falls below
  `holdout_fraction`: adding files never moves an image between splits.
- **Content-defined chunks.** Within a split, in listing order, a chunk ends after an image whose
  key hashes to a boundary (at least `samples_per_shard/2` images per chunk, at most 4x the mean).
  A boundary depends on its own key only, so new or changed files change only the chunks they
  fall into; the chunks around them keep their boundaries and their shards. (Hashing keys into a
  fixed number of buckets would spread a night's new files over every bucket; fixed-size chunks
  would shift every boundary after the first insertion.)
- **Shards named by their chunk.** A chunk's id hashes its images' keys, labels, sizes and
  versions plus the settings; the shard's key carries it. A rerun re-verifies (sha256) and keeps
  the shard of every chunk seen before, and writes only new or changed chunks. Bytes depend on
  the chunk only (fixed tar mtime, fixed order): the same whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain, islice
from typing import Literal

import numpy as np

from tasks import layout
from tasks.config import DataConfig, RayConfig, StorageConfig
from tasks.records import (
    DatasetManifest,
    RecordFormatError,
    ShardInfo,
    ShardResult,
    SkippedFile,
    SplitInfo,
)
from tasks.shard.datasets import load_source
from tasks.shard.sources import (
    BadImageError,
    FileSource,
    Item,
    Listing,
    file_source,
    iter_image_bytes,
    prepare_image,
    source_url,
)
from tasks.storage import Store, open_store
from tasks.webdata import RawSample, encode_png, write_shard

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
_FORMAT = "dataset@2"  # part of every shard set's identity: a new record format, new shards


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


def chunk_id(shard_set: str, split: layout.Split, items: Iterable[Item]) -> str:
    """sha256 of the settings and of every image's key, label, size and version."""
    h = hashlib.sha256(f"{shard_set}|{split}|".encode())
    for it in items:
        h.update(f"{it.key}\0{it.label}\0{it.size}\0{it.version}\n".encode())
    return h.hexdigest()


def sample_key(key: str) -> str:
    """A webdataset `__key__` for an image key: '.' starts a member's extension in a tar, so it
    (and '%', to stay one-to-one) is percent-encoded: 'cats/1.png' -> 'cats/1%2Epng'."""
    return key.replace("%", "%25").replace(".", "%2E")


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


def verify_manifest(store: Store, manifest: DatasetManifest) -> list[str]:
    """Re-hash every shard; returns the keys whose sha256 differs from the manifest (empty = all good)."""
    bad = []
    for split in manifest.splits.values():
        for shard in split.shards:
            try:
                if store.sha256(shard.key) != shard.sha256:
                    bad.append(shard.key)
            except FileNotFoundError:
                bad.append(shard.key)
    return bad


class _Progress:
    """Console progress from the driver: images done, rate, ETA. The total comes from a count of
    the listing that runs beside the work (listing is much faster than sharding); until it is
    known, the line says how many images were listed so far."""

    def __init__(self, total: int | None = None) -> None:
        self.start = self.last = time.monotonic()
        self.listed = self.done = 0
        self.total = total
        self._counter: threading.Timer | None = None

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            log.info(
                "shard: %d/%d images (%.0f%%), %.0f images/s, ETA %.0f s",
                self.done,
                self.total,
                100.0 * self.done / self.total,
                rate,
                max(self.total - self.done, 0) / max(rate, 1e-9),
            )
        else:
            log.info(
                "shard: %d images (%d listed so far), %.0f images/s", self.done, self.listed, rate
            )

    def count_beside(self, count: Callable[[], int]) -> None:
        """Count in a thread that starts only once the job has run for half a progress interval:
        a short job (the common nightly rerun) never lists its source twice."""

        def run() -> None:
            with contextlib.suppress(Exception):  # the listing itself reports what went wrong
                self.total = count()

        self._counter = threading.Timer(PROGRESS_EVERY_S / 2, run)
        self._counter.name, self._counter.daemon = "shard-count", True
        self._counter.start()

    def close(self) -> None:
        if self._counter is not None:
            self._counter.cancel()


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


def _shard_set(plan: _Plan, cfg: DataConfig) -> str:
    """The folder's identity: the source and every setting that shapes a shard's bytes."""
    settings = (
        f"{_FORMAT}|{plan.source}|size={cfg.image_size}|channels={plan.channels}|"
        f"holdout={cfg.holdout_fraction}|seed={cfg.seed}|per_shard={cfg.samples_per_shard}"
    )
    return hashlib.sha256(settings.encode()).hexdigest()


def _previous(store: Store, key: str) -> DatasetManifest | None:
    try:
        return DatasetManifest.read_or_none(store, key)
    except RecordFormatError as err:
        log.warning("not reusing the shards of %s: %s", store.url(key), err)
        return None


def shard_dataset(cfg: DataConfig, store: Store, ray_cfg: RayConfig | None = None) -> ShardResult:
    """Shard `cfg.dataset` into `store`, keeping the shards of chunks an earlier run wrote (after
    re-verifying their sha256); the manifest is written last. Returns the earlier manifest itself
    (`reused`) when nothing changed."""
    plan = _plan(cfg, store)
    shard_set = _shard_set(plan, cfg)
    prefix = layout.dataset_prefix(plan.name, shard_set)
    manifest_key = layout.dataset_manifest(prefix)
    previous = _previous(store, manifest_key)
    earlier: dict[str, ShardInfo] = {}
    earlier_skips: dict[str | None, list[SkippedFile]] = {}
    if previous is not None:
        earlier = {s.chunk: s for sp in previous.splits.values() for s in sp.shards if s.chunk}
        for skip in previous.skipped:
            earlier_skips.setdefault(skip.chunk, []).append(skip)

    settings = ShardSettings(
        store.config, plan.file_source, plan.channels, plan.image_size, cfg.on_bad_file
    )
    workers = _workers(cfg, ray_cfg, plan.file_source is not None)
    run = _on_ray(settings, workers) if workers else _in_process(settings)
    progress = _Progress(len(plan.pixels) if plan.pixels is not None else None)
    if plan.file_source is not None:
        src, limit = plan.file_source, cfg.max_images
        progress.count_beside(
            lambda: sum(1 for _ in islice(Listing(src, "skip"), limit))  # names only
        )
    listed = hashlib.sha256(f"{plan.source}|".encode())
    per_label: Counter[int] = Counter()

    def jobs() -> Iterator[ChunkJob]:
        cutters = {s: ChunkCutter(cfg.samples_per_shard) for s in layout.SPLITS}
        positions: dict[layout.Split, list[int]] = {s: [] for s in layout.SPLITS}
        try:
            for n, item in enumerate(plan.items):
                listed.update(f"{item.key}\0{item.label}\0{item.size}\0{item.version}\n".encode())
                per_label[item.label] += 1
                progress.listed += 1
                split = split_of(item.key, cfg.holdout_fraction, cfg.seed)
                positions[split].append(n)
                chunk = cutters[split].add(item)
                if chunk is not None:
                    yield from make(split, chunk, positions[split])
                    positions[split] = []
        finally:
            progress.close()  # the listing ended: no count needed
        progress.total = progress.listed
        for split, cutter in cutters.items():
            if cutter.items:
                yield from make(split, cutter.items, positions[split])

    # Per split, the chunks as they finish: (seq, shard, skipped files); their items are dropped.
    done: dict[layout.Split, list[tuple[int, ShardInfo | None, tuple[SkippedFile, ...]]]] = {
        s: [] for s in layout.SPLITS
    }
    unusable: Counter[int] = Counter()
    seq = 0

    def make(split: layout.Split, items: list[Item], at: list[int]) -> Iterator[ChunkJob]:
        nonlocal seq
        seq += 1
        cid = chunk_id(shard_set, split, items)
        if cid in earlier_skips and cid not in earlier:  # every image of it was bad last time
            skipped = tuple(earlier_skips[cid])
            bad = {s.path for s in skipped}
            unusable.update(it.label for it in items if it.key in bad)
            done[split].append((seq, None, skipped))
            progress.add(len(items))
            return
        pixels = plan.pixels[at] if plan.pixels is not None else None
        key = layout.dataset_shard(prefix, split, cid)
        yield ChunkJob(seq, split, cid, key, tuple(items), pixels, earlier.get(cid))

    sizes: set[int] = set()
    written = kept = 0
    for job, result in run(jobs()):
        skipped = earlier_skips.get(job.chunk, ()) if result.kept else result.skipped
        kept += result.kept
        written += result.shard is not None and not result.kept
        if result.damaged:
            log.warning(
                "shard %s was missing or did not match the manifest's sha256: rewritten from "
                "the source",
                store.url(job.key),
            )
        if result.image_size is not None:
            sizes.add(result.image_size)
        if skipped:
            bad = {s.path for s in skipped}
            unusable.update(it.label for it in job.items if it.key in bad)
        done[job.split].append((job.seq, result.shard, tuple(skipped)))
        progress.add(len(job.items))

    class_names = plan.class_names()
    splits = {s: _split_info(done[s], s, progress.listed, cfg) for s in layout.SPLITS}
    image_size = _image_size(plan, sizes, previous, store)
    empty = [class_names[i] for i, n in per_label.items() if n == unusable[i]]
    if empty:
        raise ValueError(
            f"class(es) {empty} of {plan.source} have no usable image (all skipped as bad "
            "files); fix the files or remove the class folder(s)"
        )
    skipped_files = [
        s for sp in layout.SPLITS for _, _, sk in sorted(done[sp], key=lambda c: c[0]) for s in sk
    ]
    if plan.listing is not None:
        skipped_files = plan.listing.skipped + skipped_files
    fingerprint = _fingerprint(shard_set, splits, skipped_files)
    if previous is not None and previous.fingerprint == fingerprint and written == 0:
        log.info("reusing shards of %s (fingerprint %s)", store.url(prefix), fingerprint[:12])
        return ShardResult(manifest=previous, reused=True, kept=kept)

    manifest = DatasetManifest(
        dataset=plan.name,
        source=plan.source,
        shard_set=shard_set,
        fingerprint=fingerprint,
        source_fingerprint=listed.hexdigest(),
        image_size=image_size,
        channels=plan.channels,
        num_classes=len(class_names),
        class_names=class_names,
        splits=splits,
        skipped=skipped_files,
        config=cfg,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest.write(store, manifest_key)
    if plan.listing is not None and plan.listing.ignored:
        log.info("ignored %d file(s) that are not images", plan.listing.ignored)
    log.info(
        "sharded %s: %d train / %d holdout images, %d skipped; %d shard(s) written, %d kept -> %s",
        plan.name,
        splits["train"].count,
        splits["holdout"].count,
        len(skipped_files),
        written,
        kept,
        store.url(prefix),
    )
    return ShardResult(manifest=manifest, reused=False, written=written, kept=kept)


def _split_info(
    chunks: list[tuple[int, ShardInfo | None, tuple[SkippedFile, ...]]],
    split: layout.Split,
    n_images: int,
    cfg: DataConfig,
) -> SplitInfo:
    shards = [shard for _, shard, _ in sorted(chunks, key=lambda c: c[0]) if shard is not None]
    count = sum(s.count for s in shards)
    if count == 0:
        raise ValueError(
            f"the {split} split is empty: {n_images} image(s) listed, data.holdout_fraction="
            f"{cfg.holdout_fraction} (each image's split is a hash of its key); add images or "
            "change data.holdout_fraction"
        )
    return SplitInfo(count=count, shards=shards)


def _image_size(
    plan: _Plan, sizes: set[int], previous: DatasetManifest | None, store: Store
) -> int:
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


def _fingerprint(
    shard_set: str, splits: dict[layout.Split, SplitInfo], skipped: list[SkippedFile]
) -> str:
    """The set's content: every shard's chunk and sha256, and the chunks left empty."""
    h = hashlib.sha256(f"{shard_set}|".encode())
    for name, split in splits.items():
        for s in split.shards:
            h.update(f"{name}\0{s.chunk}\0{s.sha256}\n".encode())
    for skip in skipped:
        h.update(f"skipped\0{skip.path}\0{skip.chunk}\n".encode())
    return h.hexdigest()
