"""Sample stage: N images cut into seed ranges; one Ray task per range loads the weights once and
writes one WebDataset shard (png, seed, label) to the object store.

Image i has seed `seed_start + i` and its own generator, so it depends on its seed only, never on the
batch size, the worker or a retry. A rerun skips the ranges whose shard and `.json` receipt already
exist (the receipt is written after the shard, so its presence means a complete shard), which makes
a large job resumable; the sample-set manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime

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
from tasks.ray_runtime import check_resources, ensure_ray
from tasks.records import Checkpoint, SampleSet, SampleShard
from tasks.storage import Store, open_store
from tasks.webdata import RawSample, encode_png, write_shard

log = logging.getLogger(__name__)


def seed_ranges(num_images: int, per_task: int, seed_start: int) -> list[tuple[int, int]]:
    return [
        (s, min(s + per_task, seed_start + num_images))
        for s in range(seed_start, seed_start + num_images, per_task)
    ]


def label_for_seed(seed: int, num_classes: int) -> int:
    """Class of a conditional sample: a function of its seed (balanced over classes)."""
    return seed % num_classes


def sample_set_name(checkpoint: Checkpoint, cfg: SampleConfig) -> str:
    """A sample set's name: the checkpoint step and every setting that changes the images."""
    settings = {"format": SampleSet.expected_format(), **cfg.image_settings()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return layout.sample_set_name(checkpoint.step, cfg.sampler, cfg.steps, digest)


def find_sample_set(store: Store, checkpoint: Checkpoint, cfg: SampleConfig) -> SampleSet | None:
    """The complete sample set of `checkpoint` with these settings, or None."""
    prefix = layout.sample_set_prefix(checkpoint.run_id, sample_set_name(checkpoint, cfg))
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
) -> tuple[np.ndarray, list[int | None]]:
    """Images for `seeds` as uint8 [N, C, H, W] and their labels (None when unconditional)."""
    model: ModelConfig = checkpoint.model
    ucfg = checkpoint.unet  # `net` may be a compiled wrapper
    alpha_bar = alpha_bar_from_betas(make_betas(model.schedule, model.num_timesteps)).to(device)
    timesteps = make_timesteps(model.num_timesteps, cfg.steps, cfg.spacing, alpha_bar=alpha_bar).to(
        device
    )
    shape = (ucfg.in_channels, ucfg.image_size, ucfg.image_size)
    out: list[np.ndarray] = []
    labels: list[int | None] = []
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
        out.append(pixels)
        labels.extend(y.tolist() if y is not None else [None] * len(chunk))
    return np.concatenate(out), labels


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
    """One unit of work: generate seeds [seed_start, seed_stop) and write their shard, then its
    receipt. Idempotent: returns (receipt, reused), reused when the receipt already existed.

    `weights_key` holds {"model": the weights to sample with} (a sample set's weights.pt).
    """
    store = open_store(storage)
    done = SampleShard.read_or_none(store, receipt_key)
    if done is not None and store.exists(shard_key):
        return done, True
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    state = load_checkpoint(store.read_bytes(weights_key), map_location=device)
    unet = load_denoiser_net(state["model"], checkpoint, device)
    net: torch.nn.Module = unet
    if cfg.channels_last or cfg.compile:
        net = configure_model_for_device(
            net, device, channels_last=cfg.channels_last, compile=cfg.compile
        )
    seeds = list(range(seed_start, seed_stop))
    images, labels = generate(net, checkpoint, seeds, cfg, device)
    samples: list[RawSample] = [
        {
            "__key__": f"{seed:010d}",
            "png": encode_png(img.transpose(1, 2, 0)),
            "json": {"seed": seed, "label": label},
            **({"cls": label} if label is not None else {}),
        }
        for seed, img, label in zip(seeds, images, labels, strict=True)
    ]
    info = write_shard(store, shard_key, samples)
    receipt = SampleShard(**info.model_dump(), seed_start=seed_start, seed_stop=seed_stop)
    receipt.write(store, receipt_key)
    return receipt, False


def _write_weights(store: Store, checkpoint: Checkpoint, use_ema: bool, key: str) -> None:
    """The weights the tasks sample with, alone: a training checkpoint also holds the raw model and
    AdamW's two moments (~4x the bytes), which every task would otherwise download."""
    state = load_checkpoint(checkpoint.read_bytes(store))
    weights = (
        state["ema"]["model"] if use_ema and "model" in state.get("ema", {}) else state["model"]
    )
    bad = [name for name, w in weights.items() if w.is_floating_point() and not w.isfinite().all()]
    if bad:
        raise ValueError(
            f"checkpoint {store.url(checkpoint.key)} has non-finite weights ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); refusing to sample from a diverged model"
        )
    store.write_bytes(
        key,
        save_checkpoint(
            {
                "model": weights,
                "step": checkpoint.step,
                "config": checkpoint.model_dump(mode="json"),
            }
        ),
    )


def sample_images(
    store: Store, cfg: SampleConfig, ray_cfg: RayConfig, checkpoint: Checkpoint
) -> SampleSet:
    """Fan the seed ranges of `checkpoint`'s sample set out as Ray tasks; the manifest is last.

    A complete set is returned as it is, without touching the checkpoint."""
    name = sample_set_name(checkpoint, cfg)
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
    if not store.exists(weights_key):
        _write_weights(store, checkpoint, cfg.use_ema, weights_key)

    ensure_ray(ray_cfg)
    task_resources = {"CPU": cfg.cpus_per_task, **({"GPU": 1.0} if cfg.use_gpu else {})}
    check_resources(ray_cfg, task_resources, 1, "a sampling task")
    import ray

    # Ray re-runs a task whose worker process died; errors were already retried by the store.
    remote = ray.remote(sample_seed_range).options(
        num_cpus=cfg.cpus_per_task,
        num_gpus=1 if cfg.use_gpu else 0,
        max_retries=3,
        retry_exceptions=False,
    )
    ranges = seed_ranges(cfg.num_images, cfg.images_per_task, cfg.seed_start)
    refs = [
        remote.remote(
            store.config,
            checkpoint,
            weights_key,
            cfg,
            a,
            b,
            layout.sample_shard(prefix, n),
            layout.sample_receipt(prefix, n),
        )
        for n, (a, b) in enumerate(ranges)
    ]
    results: list[tuple[SampleShard, bool]] = ray.get(refs)
    shards = [shard for shard, _ in results]
    log.info(
        "sampled %d images in %d shards (%d reused) -> %s",
        cfg.num_images,
        len(shards),
        sum(reused for _, reused in results),
        store.url(prefix),
    )
    sample_set = SampleSet(
        name=name,
        run_id=checkpoint.run_id,
        checkpoint=checkpoint,
        weights_key=weights_key,
        num_images=cfg.num_images,
        image_size=checkpoint.unet.image_size,
        channels=checkpoint.unet.in_channels,
        shards=shards,
        config=cfg,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    sample_set.write(store, layout.sample_manifest(prefix))
    return sample_set
