"""Sample stage: a pool of long-lived Ray actors works through the seed ranges of a sample set;
each range becomes one WebDataset shard (png, seed, label) plus its `.json` receipt.

Image i has seed `seed_start + i` and its own generator, so it depends on its seed only, never on the
batch size, the actor, a retry or a restart. Each actor loads the weights once and then takes range
after range, with the next one already queued on it (no idle gap while the driver takes a receipt);
the driver hands out ranges and gathers receipts, never images,
so its memory does not grow with the number of images. A killed actor is restarted and its range is
re-run (`sample.max_restarts`); a range writes the same bytes whoever runs it. A rerun skips the
ranges whose shard and receipt already exist (the receipt is written after the shard), and the
sample-set manifest is written last.

With `evaluate.repeats = k` a set holds k disjoint seed ranges of `num_images` each (seeds
`seed_start .. seed_start + k * num_images - 1`); `repeats` is part of the set's name digest, so a
set of k repeats is a different set from one of 1 (whose first `num_images` images it shares).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import torch

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.perf import autocast, configure_model_for_device
from diffusion_core.samplers import make_eps_denoiser, sample
from diffusion_core.schedules import alpha_bar_from_betas, make_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from diffusion_core.unet import UNet
from tasks import layout
from tasks.config import ModelConfig, RayConfig, SampleConfig, StorageConfig
from tasks.jobs import Progress, pool_size
from tasks.ray_runtime import check_resources, ensure_ray
from tasks.records import Checkpoint, SampleSet, SampleShard
from tasks.storage import Store, open_store
from tasks.webdata import RawSample, encode_png, write_shard

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


def label_for_seed(seed: int, num_classes: int) -> int:
    """Class of a conditional sample: a function of its seed (balanced over classes)."""
    return seed % num_classes


def sample_set_name(checkpoint: Checkpoint, cfg: SampleConfig, repeats: int = 1) -> str:
    """A sample set's name: the checkpoint step and every setting that changes the images,
    `repeats` included (it changes which seeds the set holds)."""
    settings = {
        "format": SampleSet.expected_format(),
        **cfg.image_settings(),
        "repeats": repeats,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return layout.sample_set_name(checkpoint.step, cfg.sampler, cfg.steps, digest)


def find_sample_set(
    store: Store, checkpoint: Checkpoint, cfg: SampleConfig, repeats: int = 1
) -> SampleSet | None:
    """The complete sample set of `checkpoint` with these settings, or None."""
    prefix = layout.sample_set_prefix(checkpoint.run_id, sample_set_name(checkpoint, cfg, repeats))
    return SampleSet.read_or_none(store, layout.sample_manifest(prefix))


def load_denoiser_net(
    weights: dict[str, torch.Tensor], checkpoint: Checkpoint, device: torch.device
) -> UNet:
    net = UNet(checkpoint.unet)
    net.load_state_dict(weights)
    return net.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def generate(
    net: torch.nn.Module,
    checkpoint: Checkpoint,
    seeds: list[int],
    cfg: SampleConfig,
    device: torch.device,
) -> Iterator[tuple[list[int], np.ndarray, list[int | None]]]:
    """Images for `seeds`, batch by batch: the batch's seeds, uint8 [B, C, H, W] and their labels
    (None when unconditional)."""
    model: ModelConfig = checkpoint.model
    ucfg = checkpoint.unet  # `net` may be a compiled wrapper
    alpha_bar = alpha_bar_from_betas(make_betas(model.schedule, model.num_timesteps)).to(device)
    timesteps = make_timesteps(model.num_timesteps, cfg.steps, cfg.spacing, alpha_bar=alpha_bar).to(
        device
    )
    shape = (ucfg.in_channels, ucfg.image_size, ucfg.image_size)
    for b in range(0, len(seeds), cfg.batch_size):
        chunk = seeds[b : b + cfg.batch_size]
        noise = ImageNoise(chunk, device=device)
        y = None
        if ucfg.num_classes is not None:
            y = torch.tensor([label_for_seed(s, ucfg.num_classes) for s in chunk], device=device)
        denoiser = make_eps_denoiser(
            net,
            alpha_bar=alpha_bar,
            prediction_type=model.prediction_type,
            class_labels=y,
            guidance_scale=cfg.guidance_scale,
            null_label=ucfg.num_classes,
            clip_x0=1.0 if cfg.clip_x0 else None,
        )
        with autocast(device, enabled=cfg.bf16):
            x = sample(
                cfg.sampler,
                denoiser,
                noise.randn(shape),
                timesteps,
                alpha_bar=alpha_bar,
                noise=noise,
                eta=cfg.eta,
            )
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        yield chunk, pixels, (y.tolist() if y is not None else [None] * len(chunk))


class SeedRangeSampler:
    """Loads the weights once, then samples seed range after seed range into shards. Used in
    this process (`sample_seed_range`) and as the Ray actor of `sample_images`.

    `weights_key` holds {"model": the weights to sample with} (a sample set's weights.pt);
    `threads` caps torch's CPU threads (an actor's share of the node)."""

    def __init__(
        self,
        storage: StorageConfig,
        checkpoint: Checkpoint,
        weights_key: str,
        cfg: SampleConfig,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.store = open_store(storage)
        self.checkpoint, self.cfg = checkpoint, cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        state = load_checkpoint(self.store.read_bytes(weights_key), map_location=self.device)
        net: torch.nn.Module = load_denoiser_net(state["model"], checkpoint, self.device)
        if cfg.channels_last or cfg.compile:
            net = configure_model_for_device(
                net, self.device, channels_last=cfg.channels_last, compile=cfg.compile
            )
        self.net = net

    def pid(self) -> int:
        return os.getpid()

    def run(
        self, seed_start: int, seed_stop: int, shard_key: str, receipt_key: str
    ) -> tuple[SampleShard, bool]:
        """Generate seeds [seed_start, seed_stop) and write their shard, then its receipt.
        Idempotent: returns (receipt, reused), reused when the receipt already existed."""
        done = _complete(self.store, shard_key, receipt_key)
        if done is not None:
            return done, True
        seeds = list(range(seed_start, seed_stop))

        def samples() -> Iterator[RawSample]:  # encoded batch by batch, as the tar is written
            for chunk, images, labels in generate(
                self.net, self.checkpoint, seeds, self.cfg, self.device
            ):
                for seed, img, label in zip(chunk, images, labels, strict=True):
                    yield {
                        "__key__": f"{seed:010d}",
                        "png": encode_png(img.transpose(1, 2, 0)),
                        "json": {"seed": seed, "label": label},
                        **({"cls": label} if label is not None else {}),
                    }

        info = write_shard(self.store, shard_key, samples())
        receipt = SampleShard(
            key=info.key,
            count=info.count,
            sha256=info.sha256,
            bytes=info.bytes,
            seed_start=seed_start,
            seed_stop=seed_stop,
        )
        receipt.write(self.store, receipt_key)
        return receipt, False


def _complete(store: Store, shard_key: str, receipt_key: str) -> SampleShard | None:
    done = SampleShard.read_or_none(store, receipt_key)
    return done if done is not None and store.exists(shard_key) else None


def sample_seed_range(
    storage: StorageConfig,
    checkpoint: Checkpoint,
    weights_key: str,
    cfg: SampleConfig,
    seed_start: int,
    seed_stop: int,
    shard_key: str,
    receipt_key: str,
) -> tuple[SampleShard, bool]:
    """One seed range in this process (what an actor of `sample_images` does for each range)."""
    done = _complete(open_store(storage), shard_key, receipt_key)
    if done is not None:
        return done, True
    sampler = SeedRangeSampler(storage, checkpoint, weights_key, cfg)
    return sampler.run(seed_start, seed_stop, shard_key, receipt_key)


def _write_weights(store: Store, checkpoint: Checkpoint, use_ema: bool, key: str) -> Weights:
    """The weights the actors sample with, alone: a training checkpoint also holds the raw model
    and AdamW's two moments (~4x the bytes), which every actor would otherwise download. Returns
    which weights they are (a checkpoint without an EMA yields its raw model)."""
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
    store.write_bytes(
        key,
        save_checkpoint(
            {
                "model": weights,
                "step": checkpoint.step,
                "extra": {"weights": kind},
                "config": checkpoint.model_dump(mode="json"),
            }
        ),
    )
    return kind


def _weights_kind(store: Store, key: str) -> Weights:
    state = load_checkpoint(store.read_bytes(key))
    return "raw" if state.get("extra", {}).get("weights") == "raw" else "ema"


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

    A complete set is returned as it is, without touching the checkpoint; the ranges of an
    incomplete one that are already done are kept."""
    name = sample_set_name(checkpoint, cfg, repeats)
    prefix = layout.sample_set_prefix(checkpoint.run_id, name)
    existing = SampleSet.read_or_none(store, layout.sample_manifest(prefix))
    if existing is not None:
        log.info("sample set %s is complete: reusing it", store.url(prefix))
        return existing
    if cfg.sampler == "heun" and checkpoint.model.schedule == "cosine":
        log.warning(
            "sampler 'heun' on the cosine schedule is very inaccurate at practical step counts "
            "(it starts from sigma ~2e4; benchmarks/RESULTS.md): prefer ddim or dpmpp_2m"
        )

    weights_key = layout.sample_weights(prefix)
    if store.exists(weights_key):
        weights = _weights_kind(store, weights_key)
    else:
        weights = _write_weights(store, checkpoint, cfg.use_ema, weights_key)

    ranges = set_seed_ranges(cfg, repeats)
    keys = [
        (layout.sample_shard(prefix, n), layout.sample_receipt(prefix, n))
        for n in range(len(ranges))
    ]
    listed = set(store.list(prefix))
    shards: dict[int, SampleShard] = {}
    for n, (shard_key, receipt_key) in enumerate(keys):
        if shard_key in listed and receipt_key in listed:
            done = SampleShard.read_or_none(store, receipt_key)
            if done is not None:
                shards[n] = done
    total = repeats * cfg.num_images
    progress = Progress("sampling", total)
    progress.skip(sum(s.count for s in shards.values()))
    pending = [n for n in range(len(ranges)) if n not in shards]
    if pending:
        shards |= _run_pool(
            store, cfg, ray_cfg, checkpoint, weights_key, ranges, keys, pending, progress
        )
    log.info(
        "sampled %d images in %d shards (%d reused) -> %s",
        total,
        len(shards),
        len(ranges) - len(pending),
        store.url(prefix),
    )
    sample_set = SampleSet(
        name=name,
        run_id=checkpoint.run_id,
        checkpoint=checkpoint,
        weights_key=weights_key,
        weights=weights,
        num_images=cfg.num_images,
        repeats=repeats,
        image_size=checkpoint.unet.image_size,
        channels=checkpoint.unet.in_channels,
        shards=[shards[n] for n in range(len(ranges))],
        config=cfg,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    sample_set.write(store, layout.sample_manifest(prefix))
    return sample_set


QUEUED_PER_ACTOR = 2  # ranges handed to an actor at once: one running, one waiting in its queue


def _run_pool(
    store: Store,
    cfg: SampleConfig,
    ray_cfg: RayConfig,
    checkpoint: Checkpoint,
    weights_key: str,
    ranges: list[tuple[int, int]],
    keys: list[tuple[str, str]],
    pending: list[int],
    progress: Progress,
) -> dict[int, SampleShard]:
    """Run the `pending` ranges on an actor pool; their receipts by range index."""
    ensure_ray(ray_cfg)
    bundle = {"CPU": cfg.cpus_per_task, **({"GPU": 1.0} if cfg.use_gpu else {})}
    check_resources(ray_cfg, bundle, 1, "a sampling task")
    import ray

    size = pool_size(ray_cfg, bundle, cfg.num_workers, len(pending))
    # A killed actor (lost node, OOM, SIGKILL) is restarted and its unfinished range re-run there:
    # a range writes the same bytes whoever runs it, and the receipt makes re-running it safe.
    actor_cls = ray.remote(SeedRangeSampler).options(
        num_cpus=cfg.cpus_per_task,
        num_gpus=1 if cfg.use_gpu else 0,
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_restarts,
    )
    threads = max(1, int(cfg.cpus_per_task))
    actors: list[Any] = [  # Ray actor handles
        actor_cls.remote(store.config, checkpoint, weights_key, cfg, threads) for _ in range(size)
    ]
    log.info(
        "sampling %d images in %d seed ranges on %d actor(s) (%s each)",
        sum(ranges[n][1] - ranges[n][0] for n in pending),
        len(pending),
        size,
        ", ".join(f"{r}: {a:g}" for r, a in bundle.items()),
    )
    done: dict[int, SampleShard] = {}
    todo = deque(pending)
    running: dict[Any, tuple[Any, int]] = {}  # ObjectRef -> (actor, range index)

    def give(actor: Any) -> None:
        if todo:
            n = todo.popleft()
            running[actor.run.remote(*ranges[n], *keys[n])] = (actor, n)

    try:
        for _ in range(QUEUED_PER_ACTOR):
            for actor in actors:
                give(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, n = running.pop(ready[0])
            give(actor)  # before the receipt is read: the actor never waits on the driver
            shard, _ = ray.get(ready[0])
            done[n] = shard
            progress.update(shard.count)
    finally:
        for actor in actors:
            ray.kill(actor)
    return done
