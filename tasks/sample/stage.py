"""Sample stage: a pool of long-lived Ray actors (`tasks.sample.generate`) works through the seed
ranges of a sample set; each range becomes one WebDataset shard (png, seed, label) plus its `.json`
receipt. This module is the driver: it names the set, splits it into seed ranges, hands them out and
gathers the receipts, never images, so its memory does not grow with the number of images.

Each actor loads the weights once and then takes range after range, with the next one already queued
on it (no idle gap while the driver takes a receipt). A killed actor is restarted and its range is
re-run (`sample.max_restarts`); a range writes the same bytes whoever runs it. A rerun keeps the
ranges whose receipt exists (the receipt is written after the shard) and whose shard still has the
receipt's sha256; a damaged or missing shard is sampled again, with the same bytes. The sample-set
manifest is written last.

With `evaluate.repeats = k` a set holds k disjoint seed ranges of `num_images` each (seeds
`seed_start .. seed_start + k * num_images - 1`); `repeats` is part of the set's name digest, so a
set of k repeats is a different set from one of 1 (whose first `num_images` images it shares).

A sampler sweep (`sample_grid`) samples several settings of one checkpoint as one job: each actor
loads the weights once and takes (setting, seed range) after (setting, seed range); every setting
still gets the very set `sample_images` would write for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from tasks import layout
from tasks.config import RayConfig, SampleConfig
from tasks.jobs import Progress, pool_size
from tasks.ray_runtime import check_resources, ensure_ray, restartable
from tasks.records import Checkpoint, SampleSet, SampleShard, SampleWeights
from tasks.sample.generate import SeedRangeSampler
from tasks.sample.grid import check_same_job, describe_setting
from tasks.storage import Store

log = logging.getLogger(__name__)

Weights = Literal["ema", "raw"]


def seed_ranges(num_images: int, per_task: int, seed_start: int) -> list[tuple[int, int]]:
    return [
        (s, min(s + per_task, seed_start + num_images))
        for s in range(seed_start, seed_start + num_images, per_task)
    ]


def set_seed_ranges(cfg: SampleConfig, repeats: int) -> list[tuple[int, int]]:
    """The shards' seed ranges, repeat after repeat: a range never spans two repeats."""
    return [
        r
        for j in range(repeats)
        for r in seed_ranges(
            cfg.num_images, cfg.images_per_task, cfg.seed_start + j * cfg.num_images
        )
    ]


def sample_set_name(checkpoint: Checkpoint, cfg: SampleConfig, repeats: int = 1) -> str:
    """A sample set's name: the checkpoint step and every setting that changes the images,
    `repeats` included (it changes which seeds the set holds)."""
    settings: dict[str, object] = {
        "format": SampleSet.expected_format(),
        **cfg.image_settings(),
        "repeats": repeats,
    }
    if checkpoint.phema_sigma_rel is not None:  # an EMA rebuilt at the step: other weights
        settings["phema_sigma_rel"] = checkpoint.phema_sigma_rel
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return layout.sample_set_name(checkpoint.step, cfg.sampler, cfg.steps, digest)


def find_sample_set(
    store: Store, checkpoint: Checkpoint, cfg: SampleConfig, repeats: int = 1
) -> SampleSet | None:
    """The complete sample set of `checkpoint` with these settings, or None."""
    prefix = layout.sample_set_prefix(checkpoint.run_id, sample_set_name(checkpoint, cfg, repeats))
    return SampleSet.read_or_none(store, layout.sample_manifest(prefix))


def _extract_weights(store: Store, checkpoint: Checkpoint, use_ema: bool) -> tuple[bytes, Weights]:
    """The weights the actors sample with, alone: a training checkpoint also holds the raw model
    and AdamW's two moments (~4x the bytes), which every actor would otherwise download. Returns
    the weights file's bytes and which weights they are (a checkpoint without an EMA yields its
    raw model)."""
    state = load_checkpoint(checkpoint.read_bytes(store))
    ema = use_ema and "model" in state.get("ema", {})
    weights = state["ema"]["model"] if ema else state["model"]
    bad = [name for name, w in weights.items() if w.is_floating_point() and not w.isfinite().all()]
    if bad:
        raise ValueError(
            f"checkpoint {store.url(checkpoint.key)} has non-finite weights ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); refusing to sample from a diverged model"
        )
    kind: Weights = "ema" if ema else "raw"
    if use_ema and not ema:
        log.warning("checkpoint %s has no EMA weights: sampling its raw weights", checkpoint.key)
    data = save_checkpoint(
        {
            "model": weights,
            "step": checkpoint.step,
            "extra": {"weights": kind},
            "config": checkpoint.model_dump(mode="json"),
        }
    )
    return data, kind


def _weights_kind(store: Store, prefix: str) -> Weights:
    """Which weights a set's `weights.pt` holds: from `weights.json`, or, for a set written before
    that record existed, from the weights file itself (and the record is written then)."""
    record = SampleWeights.read_or_none(store, layout.sample_weights_record(prefix))
    if record is not None:
        return record.weights
    key = layout.sample_weights(prefix)
    data = store.read_bytes(key)
    state = load_checkpoint(data)
    kind: Weights = "raw" if state.get("extra", {}).get("weights") == "raw" else "ema"
    _write_weights_record(store, prefix, kind, data)
    return kind


def _write_weights_record(store: Store, prefix: str, kind: Weights, data: bytes) -> None:
    record = SampleWeights(weights=kind, sha256=hashlib.sha256(data).hexdigest())
    record.write(store, layout.sample_weights_record(prefix))


@dataclass(frozen=True)
class _Plan:
    """One sample set of a job: its settings, where it goes, its seed ranges and the receipts of
    the ranges already done and intact (by range index)."""

    cfg: SampleConfig
    name: str
    prefix: str
    existing: SampleSet | None
    ranges: list[tuple[int, int]]
    keys: list[tuple[str, str]]  # (shard, receipt) of each range
    intact: dict[int, SampleShard]

    @property
    def complete(self) -> bool:
        return self.existing is not None and len(self.intact) == len(self.ranges)

    @property
    def pending(self) -> list[int]:
        """The ranges still to sample."""
        return [n for n in range(len(self.ranges)) if n not in self.intact]


def _plan(store: Store, checkpoint: Checkpoint, cfg: SampleConfig, repeats: int) -> _Plan:
    name = sample_set_name(checkpoint, cfg, repeats)
    prefix = layout.sample_set_prefix(checkpoint.run_id, name)
    existing = SampleSet.read_or_none(store, layout.sample_manifest(prefix))
    ranges = set_seed_ranges(cfg, repeats)
    keys = [
        (layout.sample_shard(prefix, n), layout.sample_receipt(prefix, n))
        for n in range(len(ranges))
    ]
    intact = _intact_ranges(store, prefix, keys, existing)
    return _Plan(cfg, name, prefix, existing, ranges, keys, intact)


@dataclass(frozen=True)
class SampleGrid:
    """The sample sets of one job, in the order their settings were given, and how many times each
    actor of the job loaded the weights (empty when every set already existed)."""

    sets: list[SampleSet]
    weight_loads: list[int]


def sample_images(
    store: Store,
    cfg: SampleConfig,
    ray_cfg: RayConfig,
    checkpoint: Checkpoint,
    *,
    repeats: int = 1,
) -> SampleSet:
    """Sample `repeats * cfg.num_images` images of `checkpoint` on a pool of Ray actors, one shard
    per seed range; the manifest is written last.

    A complete set whose shards all match their receipts is returned as it is, without touching the
    checkpoint; of an incomplete or damaged one, the ranges that are done and intact are kept."""
    return sample_grid(store, [cfg], ray_cfg, checkpoint, repeats=repeats).sets[0]


def sample_grid(
    store: Store,
    configs: list[SampleConfig],
    ray_cfg: RayConfig,
    checkpoint: Checkpoint,
    *,
    repeats: int = 1,
) -> SampleGrid:
    """Sample one set per setting in `configs` (of the same checkpoint) as ONE job: each actor
    loads the weights once and takes (setting, seed range) after (setting, seed range).

    The settings may differ only in how images are made from the weights (`GRID_FIELDS`). Each
    set is the one `sample_images` with its settings writes (same name, shards and receipts), so
    either reuses the other's sets; complete sets are returned as they are."""
    if not configs:
        raise ValueError("nothing to sample: no sample settings given")
    check_same_job(configs)
    plans = [_plan(store, checkpoint, cfg, repeats) for cfg in configs]
    names = [p.name for p in plans]
    if len(set(names)) < len(names):
        dup = next(p.cfg for p in plans if names.count(p.name) > 1)
        raise ValueError(f"the same sample settings are given twice: {describe_setting(dup)}")
    for plan in plans:
        if plan.complete:
            log.info("sample set %s is complete: reusing it", store.url(plan.prefix))
    todo = [p for p in plans if not p.complete]
    loads: list[int] = []
    done: dict[tuple[int, int], SampleShard] = {}
    weights: dict[str, Weights] = {}
    if todo:
        if checkpoint.model.schedule == "cosine" and any(p.cfg.sampler == "heun" for p in todo):
            log.warning(
                "sampler 'heun' on the cosine schedule is very inaccurate at practical step "
                "counts (it starts from sigma ~2e4; benchmarks/RESULTS.md): prefer ddim or "
                "dpmpp_2m"
            )
        extracted: tuple[bytes, Weights] | None = None  # from the checkpoint once, for every set
        for plan in todo:
            key = layout.sample_weights(plan.prefix)
            if store.exists(key):
                weights[plan.name] = _weights_kind(store, plan.prefix)
                continue
            extracted = extracted or _extract_weights(store, checkpoint, plan.cfg.use_ema)
            store.write_bytes(key, extracted[0])
            _write_weights_record(store, plan.prefix, extracted[1], extracted[0])
            weights[plan.name] = extracted[1]

        progress = Progress("sampling", sum(repeats * p.cfg.num_images for p in todo))
        progress.skip(sum(s.count for p in todo for s in p.intact.values()))
        units = [(i, n) for i, p in enumerate(plans) if not p.complete for n in p.pending]
        if units:
            done, loads = _run_pool(
                store,
                plans,
                ray_cfg,
                checkpoint,
                layout.sample_weights(todo[0].prefix),  # the same weights in every set of the job
                units,
                progress,
            )

    sets = []
    for i, plan in enumerate(plans):
        if plan.complete:
            assert plan.existing is not None
            sets.append(plan.existing)
            continue
        shards = plan.intact | {n: shard for (j, n), shard in done.items() if j == i}
        log.info(
            "sampled %d images in %d shards (%d reused) -> %s",
            repeats * plan.cfg.num_images,
            len(shards),
            len(plan.intact),
            store.url(plan.prefix),
        )
        sets.append(_write_set(store, plan, checkpoint, weights[plan.name], shards, repeats))
    return SampleGrid(sets=sets, weight_loads=loads)


def _write_set(
    store: Store,
    plan: _Plan,
    checkpoint: Checkpoint,
    weights: Weights,
    shards: dict[int, SampleShard],
    repeats: int,
) -> SampleSet:
    """The set's manifest, written last."""
    sample_set = SampleSet(
        name=plan.name,
        run_id=checkpoint.run_id,
        checkpoint=checkpoint,
        weights_key=layout.sample_weights(plan.prefix),
        weights=weights,
        num_images=plan.cfg.num_images,
        repeats=repeats,
        image_size=checkpoint.unet.image_size,
        channels=checkpoint.unet.in_channels,
        shards=[shards[n] for n in range(len(plan.ranges))],
        config=plan.cfg,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    sample_set.write(store, layout.sample_manifest(plan.prefix))
    return sample_set


def _intact_ranges(
    store: Store, prefix: str, keys: list[tuple[str, str]], existing: SampleSet | None
) -> dict[int, SampleShard]:
    """The receipts of the ranges already done, by range index: the manifest's when the set is
    complete, else those found beside their shard; of either, only those whose shard still has the
    receipt's sha256 (each is read whole). A damaged or missing one is named in a warning."""
    listed = set(store.list(prefix))
    if existing is not None:
        found = dict(enumerate(existing.shards))
    else:
        found = {}
        for n, (shard_key, receipt_key) in enumerate(keys):
            if shard_key in listed and receipt_key in listed:
                receipt = SampleShard.read_or_none(store, receipt_key)
                if receipt is not None:
                    found[n] = receipt
    intact: dict[int, SampleShard] = {}
    for n, receipt in found.items():
        actual = store.sha256(receipt.key) if receipt.key in listed else None
        if actual == receipt.sha256:
            intact[n] = receipt
            continue
        log.warning(
            "sample shard %s %s: sampling its seeds %d..%d again",
            store.url(receipt.key),
            "is missing"
            if actual is None
            else f"is damaged (sha256 {actual[:12]}..., its receipt says {receipt.sha256[:12]}...)",
            receipt.seed_start,
            receipt.seed_stop - 1,
        )
    return intact


QUEUED_PER_ACTOR = 2  # ranges handed to an actor at once: one running, one waiting in its queue


def _run_pool(
    store: Store,
    plans: list[_Plan],
    ray_cfg: RayConfig,
    checkpoint: Checkpoint,
    weights_key: str,
    units: list[tuple[int, int]],
    progress: Progress,
) -> tuple[dict[tuple[int, int], SampleShard], list[int]]:
    """Run the `units` (set index, range index) on one actor pool; their receipts by unit, and how
    many times each actor loaded the weights."""
    cfg = plans[units[0][0]].cfg  # the pool's settings, shared by every set of the job
    ensure_ray(ray_cfg)
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1.0} if cfg.use_gpu else {})}
    check_resources(ray_cfg, bundle, 1, "a sampling task")
    import ray

    size = pool_size(ray_cfg, bundle, cfg.workers, len(units))
    # A killed actor (lost node, OOM, SIGKILL) is restarted and its unfinished range re-run there:
    # a range writes the same bytes whoever runs it, and the receipt makes re-running it safe.
    actor_cls = ray.remote(SeedRangeSampler).options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=1 if cfg.use_gpu else 0,
        **restartable(cfg.max_restarts),
    )
    threads = max(1, int(cfg.cpus_per_worker))
    actors: list[Any] = [  # Ray actor handles
        actor_cls.remote(store.config, checkpoint, weights_key, cfg, threads) for _ in range(size)
    ]
    sets = len({i for i, _ in units})
    log.info(
        "sampling %d images in %d seed ranges%s on %d actor(s) (%s each)",
        sum(b - a for i, n in units for a, b in [plans[i].ranges[n]]),
        len(units),
        f" of {sets} sample sets" if sets > 1 else "",
        size,
        ", ".join(f"{r}: {a:g}" for r, a in bundle.items()),
    )
    done: dict[tuple[int, int], SampleShard] = {}
    todo = deque(units)
    running: dict[Any, tuple[Any, tuple[int, int]]] = {}  # ObjectRef -> (actor, unit)

    def give(actor: Any) -> None:
        if todo:
            i, n = todo.popleft()
            plan = plans[i]
            # an actor's own settings travel with it; another set's with each of its ranges
            settings = None if plan.cfg is cfg else plan.cfg
            running[actor.run.remote(*plan.ranges[n], *plan.keys[n], settings)] = (actor, (i, n))

    try:
        for _ in range(QUEUED_PER_ACTOR):
            for actor in actors:
                give(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, unit = running.pop(ready[0])
            give(actor)  # before the receipt is read: the actor never waits on the driver
            shard, _ = ray.get(ready[0])
            done[unit] = shard
            progress.update(shard.count)
        loads: list[int] = ray.get([actor.loads.remote() for actor in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
    return done, loads
