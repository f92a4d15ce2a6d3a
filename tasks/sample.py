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
from typing import Any

import numpy as np
import torch

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.perf import autocast, configure_model_for_device
from diffusion_core.samplers import make_eps_denoiser, sample
from diffusion_core.schedules import alpha_bar_from_betas, make_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from diffusion_core.unet import UNet, UNetConfig
from tasks.config import PipelineConfig, SampleConfig, StorageConfig
from tasks.ray_runtime import ensure_ray
from tasks.storage import Store
from tasks.webdata import encode_png, write_shard

log = logging.getLogger(__name__)

SAMPLES_FORMAT = "diffusion-pipeline/samples@1"


def seed_ranges(num_images: int, per_task: int, seed_start: int) -> list[tuple[int, int]]:
    return [
        (s, min(s + per_task, seed_start + num_images))
        for s in range(seed_start, seed_start + num_images, per_task)
    ]


def label_for_seed(seed: int, num_classes: int) -> int:
    """Class of a conditional sample: a function of its seed (balanced over classes)."""
    return seed % num_classes


def sample_set_prefix(run_id: str, step: int, cfg: SampleConfig) -> str:
    """Where a sample set lives; the name changes with every setting that changes the images."""
    settings = {
        k: v
        for k, v in cfg.model_dump(mode="json").items()
        if k
        in (
            "sampler",
            "steps",
            "spacing",
            "eta",
            "guidance_scale",
            "seed_start",
            "num_images",
            "use_ema",
            "bf16",
        )
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"runs/{run_id}/samples/step-{step:08d}-{cfg.sampler}-{cfg.steps}-{digest}"


def denoiser_weights(state: dict[str, Any], *, use_ema: bool) -> dict[str, torch.Tensor]:
    """The weights to sample with: the EMA's when asked and present (a training checkpoint), else
    `model` (also what a sampling weights file holds)."""
    return state["ema"]["model"] if use_ema and "model" in state.get("ema", {}) else state["model"]


def load_denoiser_net(
    state: dict[str, Any], *, use_ema: bool, device: torch.device
) -> tuple[UNet, dict[str, Any]]:
    config = state["config"]
    net = UNet(UNetConfig.from_dict(config["unet"]))
    net.load_state_dict(denoiser_weights(state, use_ema=use_ema))
    return net.to(device).eval().requires_grad_(False), config


@torch.inference_mode()
def generate(
    net: torch.nn.Module,
    config: dict[str, Any],
    seeds: list[int],
    cfg: SampleConfig,
    device: torch.device,
) -> tuple[np.ndarray, list[int | None]]:
    """Images for `seeds` as uint8 [N, C, H, W] and their labels (None when unconditional)."""
    model = config["model"]
    alpha_bar = alpha_bar_from_betas(make_betas(model["schedule"], model["num_timesteps"])).to(
        device
    )
    timesteps = make_timesteps(model["num_timesteps"], cfg.steps, cfg.spacing).to(device)
    ucfg = UNetConfig.from_dict(config["unet"])  # `net` may be a compiled wrapper
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
            prediction_type=model["prediction_type"],
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
    weights_key: str,
    cfg: SampleConfig,
    seed_start: int,
    seed_stop: int,
    shard_key: str,
) -> dict[str, Any]:
    """One unit of work: generate seeds [seed_start, seed_stop) and write their shard. Idempotent.

    `weights_key` is a sample set's `weights.pt` or a training checkpoint (EMA used per `cfg.use_ema`).
    """
    store = Store(storage)
    receipt_key = shard_key.removesuffix(".tar") + ".json"
    done = store.read_json_or_none(receipt_key)
    if done is not None and store.exists(shard_key):
        return {**done, "reused": True}
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    state = load_checkpoint(store.read_bytes(weights_key), map_location=device)
    unet, config = load_denoiser_net(state, use_ema=cfg.use_ema, device=device)
    net: torch.nn.Module = unet
    if cfg.channels_last or cfg.compile:
        net = configure_model_for_device(
            net, device, channels_last=cfg.channels_last, compile=cfg.compile
        )
    seeds = list(range(seed_start, seed_stop))
    images, labels = generate(net, config, seeds, cfg, device)
    samples = (
        {
            "__key__": f"{seed:010d}",
            "png": encode_png(img.transpose(1, 2, 0)),
            "json": {"seed": seed, "label": label},
            **({"cls": label} if label is not None else {}),
        }
        for seed, img, label in zip(seeds, images, labels, strict=True)
    )
    info = write_shard(store, shard_key, samples)
    receipt = {**info.to_dict(), "seed_start": seed_start, "seed_stop": seed_stop}
    store.write_json(receipt_key, receipt)
    return {**receipt, "reused": False}


def sample_images(cfg: PipelineConfig, checkpoint_key: str) -> dict[str, Any]:
    """Fan the seed ranges out as Ray tasks; returns the sample-set manifest (with `manifest_key`)."""
    store = Store(cfg.storage)
    sc = cfg.sample
    state = load_checkpoint(store.read_bytes(checkpoint_key))
    step, ucfg = int(state["step"]), state["config"]["unet"]
    if sc.sampler == "heun" and state["config"]["model"]["schedule"] == "cosine":
        log.warning(
            "sampler 'heun' on the cosine schedule is very inaccurate at practical step counts "
            "(it starts from sigma ~2e4; benchmarks/RESULTS.md): prefer ddim or dpmpp_2m"
        )
    prefix = sample_set_prefix(cfg.train.run_id, step, sc)
    manifest_key = f"{prefix}/manifest.json"
    existing = store.read_json_or_none(manifest_key)
    if existing is not None:
        log.info("sample set %s is complete: reusing it", store.url(prefix))
        return {**existing, "manifest_key": manifest_key, "reused": True}

    # The tasks read only the weights they use: a training checkpoint also holds the raw model and
    # AdamW's two moments (~4x the bytes), which every task would otherwise download.
    weights_key = f"{prefix}/weights.pt"
    if not store.exists(weights_key):
        weights = denoiser_weights(state, use_ema=sc.use_ema)
        store.write_bytes(
            weights_key,
            save_checkpoint({"model": weights, "step": step, "config": state["config"]}),
        )

    ensure_ray(cfg.ray)
    import ray

    remote = ray.remote(sample_seed_range).options(
        num_cpus=sc.cpus_per_task,
        num_gpus=1 if sc.use_gpu else 0,
        max_retries=3,
        retry_exceptions=[ConnectionError, TimeoutError],
    )
    ranges = seed_ranges(sc.num_images, sc.images_per_task, sc.seed_start)
    refs = [
        remote.remote(store.config, weights_key, sc, a, b, f"{prefix}/shard-{n:06d}.tar")
        for n, (a, b) in enumerate(ranges)
    ]
    shards = ray.get(refs)
    reused = sum(s.pop("reused") for s in shards)
    log.info(
        "sampled %d images in %d shards (%d reused) -> %s",
        sc.num_images,
        len(shards),
        reused,
        store.url(prefix),
    )
    manifest = {
        "format": SAMPLES_FORMAT,
        "run_id": cfg.train.run_id,
        "checkpoint_key": checkpoint_key,
        "checkpoint_step": step,
        "weights_key": weights_key,
        "num_images": sc.num_images,
        "sampler": sc.sampler,
        "steps": sc.steps,
        "spacing": sc.spacing,
        "eta": sc.eta,
        "guidance_scale": sc.guidance_scale,
        "use_ema": sc.use_ema,
        "image_size": ucfg["image_size"],
        "channels": ucfg["in_channels"],
        "shards": shards,
        "config": sc.model_dump(mode="json"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.write_json(manifest_key, manifest)
    return {**manifest, "manifest_key": manifest_key, "reused": False}
