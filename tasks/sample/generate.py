"""The sampling actor: it loads the weights once, then turns seed range after seed range into
WebDataset shards (png, seed, label), each followed by its `.json` receipt.

Image i has seed `seed_start + i` and its own generator, so it depends on its seed only, never on the
batch size, the actor, a retry or a restart: a range writes the same bytes whoever runs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.perf import autocast, configure_model_for_device
from diffusion_core.samplers import make_eps_denoiser, sample
from diffusion_core.schedules import alpha_bar_from_betas, make_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from diffusion_core.unet import UNet
from tasks.config import ModelConfig, SampleConfig, StorageConfig
from tasks.records import Checkpoint, SampleShard
from tasks.storage import Store, open_store
from tasks.usage import reported
from tasks.webdata import RawSample, encode_png, write_shard


def label_for_seed(seed: int, num_classes: int) -> int:
    """Class of a conditional sample: a function of its seed (balanced over classes)."""
    return seed % num_classes


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


def completed(store: Store, shard_key: str, receipt_key: str) -> SampleShard | None:
    """The receipt of a seed range that is done: the receipt exists and its shard is there with the
    receipt's sha256 (read whole), so a shard changed after its receipt is sampled again."""
    done = SampleShard.read_or_none(store, receipt_key)
    if done is None or done.key != shard_key or not store.exists(shard_key):
        return None
    return done if store.sha256(shard_key) == done.sha256 else None


class SeedRangeSampler:
    """Loads the weights once, then samples seed range after seed range into shards: the Ray actor
    of `tasks.sample.stage.sample_images` (and, in this process, of tests and benchmarks).

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
        self.weight_loads = 0
        self.net = self._load_weights(weights_key)

    def _load_weights(self, weights_key: str) -> torch.nn.Module:
        self.weight_loads += 1  # the sampler sweep's test: once per actor, whatever the settings
        state = load_checkpoint(self.store.read_bytes(weights_key), map_location=self.device)
        net: torch.nn.Module = load_denoiser_net(state["model"], self.checkpoint, self.device)
        if self.cfg.channels_last or self.cfg.compile:
            net = configure_model_for_device(
                net, self.device, channels_last=self.cfg.channels_last, compile=self.cfg.compile
            )
        return net

    def pid(self) -> int:
        return os.getpid()

    def loads(self) -> int:
        """How many times this actor (process) loaded the weights."""
        return self.weight_loads

    @reported
    def run(
        self,
        seed_start: int,
        seed_stop: int,
        shard_key: str,
        receipt_key: str,
        settings: SampleConfig | None = None,
    ) -> tuple[SampleShard, bool]:
        """Generate seeds [seed_start, seed_stop) and write their shard, then its receipt.
        Idempotent: returns (receipt, reused), reused when the range was done and its shard intact
        (a damaged shard is written again, with the same bytes).

        `settings` (default: the actor's own) may differ from them only in how the images are
        generated from the loaded weights (sampler, steps, spacing, guidance, eta): one actor
        serves every setting of a sampler sweep (`tasks.sample.stage.sample_grid`)."""
        done = completed(self.store, shard_key, receipt_key)
        if done is not None:
            return done, True
        seeds = list(range(seed_start, seed_stop))
        cfg = settings or self.cfg

        def samples() -> Iterator[RawSample]:  # encoded batch by batch, as the tar is written
            for chunk, images, labels in generate(
                self.net, self.checkpoint, seeds, cfg, self.device
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
