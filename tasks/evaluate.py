"""Evaluate a sample set: FID/KID/IS against the held-out split, with a labelled feature extractor.

The extractor is torch-fidelity's InceptionV3 ("inception-v3-compat"). Its standard weights
(pt_inception-2015-12-05, sha256 6726825d...) make FIDs comparable with published ones; when they
cannot be had, a seeded, He-initialised stand-in of the same architecture keeps the pipeline
running, and every artifact says that its numbers are NOT comparable with published FIDs.

Weights are untrusted bytes: they are only ever read with `torch.load(weights_only=True)`.
torch-fidelity's own loader (`torch.load(path, weights_only=False)`) only ever sees an empty,
in-memory checkpoint that we serialized ourselves.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_features_to_metric,
)

from diffusion_core.fid import feature_moments, frechet_distance, kernel_inception_distance
from tasks import layout
from tasks.config import EvalConfig
from tasks.inception import ExtractorInfo, extract_features, resolve_extractor
from tasks.records import DatasetManifest, Evaluation, Metrics, SampleSet
from tasks.storage import Store
from tasks.webdata import encode_png, read_images

log = logging.getLogger(__name__)

KID_SUBSETS = 100
ISC_SPLITS = 10


@dataclass(frozen=True)
class ReferenceStats:
    """Pool features of the held-out split and their moments, as cached in the store."""

    key: str
    features: np.ndarray  # float32 [N, 2048], as stored
    mu: np.ndarray  # float64 [2048]
    sigma: np.ndarray  # float64 [2048, 2048]
    count: int
    computed: bool  # False when read from the cache


def _read_stats(
    store: Store, key: str, meta_expected: dict[str, str | int]
) -> ReferenceStats | None:
    try:
        with np.load(io.BytesIO(store.read_bytes(key)), allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            features, mu, sigma = npz["features"], npz["mu"], npz["sigma"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, OSError) as err:
        log.warning("reference stats %s unreadable (%s); recomputing", store.url(key), err)
        return None
    if (
        any(meta.get(k) != v for k, v in meta_expected.items())
        or features.shape[0] != meta_expected["count"]
    ):
        log.warning(
            "reference stats %s do not match %s; recomputing", store.url(key), meta_expected
        )
        return None
    return ReferenceStats(key, features, mu, sigma, int(meta["count"]), computed=False)


def reference_features(
    store: Store,
    manifest: DatasetManifest,
    extractor: ExtractorInfo,
    cfg: EvalConfig,
    device: str = "cpu",
) -> ReferenceStats:
    """Features of the held-out split, computed once per (dataset fingerprint, extractor, count) and
    cached in the store at `stats/<fingerprint>/<extractor sha256[:16]>-n<count>.npz`."""
    holdout = manifest.split("holdout")
    count = (
        holdout.count
        if cfg.max_reference_images is None
        else min(holdout.count, cfg.max_reference_images)
    )
    key = layout.reference_stats(manifest.fingerprint, extractor.sha256, count)
    meta: dict[str, str | int] = {
        "count": count,
        "extractor_sha256": extractor.sha256,
        "dataset_fingerprint": manifest.fingerprint,
    }
    cached = _read_stats(store, key, meta)
    if cached is not None:
        log.info("reference stats from cache %s", store.url(key))
        return cached

    images = _read_images_checked(store, [s.key for s in holdout.shards], manifest.channels, count)
    features = extract_features(images, extractor, cfg.batch_size, device)["2048"]
    mu, sigma = feature_moments(features)
    stored = features.astype(np.float32)
    meta |= {"extractor_label": extractor.label, "dataset": manifest.dataset, "created": _now()}
    buf = io.BytesIO()
    np.savez(buf, features=stored, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    store.write_bytes(key, buf.getvalue())
    log.info("reference stats of %d held-out images written to %s", count, store.url(key))
    return ReferenceStats(key, stored, mu, sigma, count, computed=True)


def _read_images_checked(store: Store, keys: list[str], channels: int, count: int) -> np.ndarray:
    """`count` images of the shards `keys`, checking that they hold what the manifest promises."""
    images, _ = read_images(store, keys, channels, count)
    if len(images) < count:
        raise ValueError(f"shards {keys} hold {len(images)} images, the manifest promises {count}")
    return images


def sample_problems(images: np.ndarray) -> list[str]:
    """What makes a sample set degenerate whatever its FID: every image flat (one value, e.g. the
    black images of a diverged model), or every image the same."""
    flat = images.reshape(len(images), -1)
    problems = []
    if (flat.max(axis=1) == flat.min(axis=1)).all():
        problems.append(f"all {len(images)} samples are flat images (a single pixel value each)")
    elif len(images) > 1 and (flat == flat[0]).all():
        problems.append(f"all {len(images)} samples are the same image")
    return problems


def _non_finite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- the task ------------------------------------------------------------------------------------
def make_grid(images_uint8: np.ndarray, min_width: int = 384) -> np.ndarray:
    """uint8 [N, C, H, W] -> uint8 [H', W', C] square grid, upscaled (nearest) to >= min_width."""
    n, c, h, w = images_uint8.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1  # a gray line between cells: small images with dark borders would run together
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 96, dtype=np.uint8)
    for i, image in enumerate(images_uint8):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    scale = max(1, math.ceil(min_width / grid.shape[1]))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def report_markdown(metrics: Metrics) -> str:
    extractor = metrics.extractor
    lines = [
        f"# Sample evaluation: run `{metrics.run_id}`, step {metrics.checkpoint_step}",
        "",
    ]
    for problem in metrics.problems:
        lines += [f"> **NOT TRUSTWORTHY: {problem}.** This evaluation is never promoted.", ""]
    if not extractor.standard:
        lines += [
            f"> **WARNING: FID computed with a stand-in extractor ({extractor.label}); "
            "these numbers are NOT comparable with published FIDs.** Compare them only with runs "
            f"that report the same extractor sha256 `{extractor.weights_sha256[:16]}`.",
            "",
        ]
    lines += ["| metric | value |", "|---|---|"]
    values = {
        "fid": metrics.fid,
        "kid_mean": metrics.kid_mean,
        "kid_std": metrics.kid_std,
        "isc_mean": metrics.isc_mean,
        "isc_std": metrics.isc_std,
    }
    lines += [f"| {name} | {v:.6g} |" for name, v in values.items() if v is not None]
    sc = metrics.sampling
    settings: dict[str, object] = {
        "sampler": sc.sampler,
        "steps": sc.steps,
        "spacing": sc.spacing,
        "eta": sc.eta,
        "guidance_scale": sc.guidance_scale,
        "seeds": f"{sc.seed_start}..{sc.seed_start + sc.num_images - 1}",
        "checkpoint_step": metrics.checkpoint_step,
        "num_images": metrics.num_images,
        "num_reference_images": metrics.num_reference_images,
        "kid_subset_size": metrics.kid_subset_size,
        "kid_subsets": metrics.kid_subsets,
        "dataset_fingerprint": metrics.dataset_fingerprint,
        "reference_stats_key": metrics.reference_stats_key,
        "created": metrics.created,
    }
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | `{v}` |" for name, v in settings.items() if v is not None]
    lines.append(f"| extractor | {extractor.label}, weights sha256 `{extractor.weights_sha256}` |")
    grid_name = posixpath.basename(metrics.grid_key)  # the report sits beside its grid
    lines += ["", "## Samples", "", f"![samples]({grid_name})", ""]
    return "\n".join(lines)


def evaluate_samples(
    store: Store,
    dataset: DatasetManifest,
    samples: SampleSet,
    cfg: EvalConfig,
    device: str = "cpu",
    *,
    cache_dir: Path | None = None,
    extractor: ExtractorInfo | None = None,
) -> Evaluation:
    """Score the sample set `samples` against the held-out split of `dataset`.

    Writes `grid.png`, `report.md` and, last, `metrics.json` (each atomically) to the set's
    evaluation folder. `extractor` skips resolution (a flow resolves once and scores many sample
    sets); by default `resolve_extractor(cfg, store)`.
    """
    got = (samples.channels, samples.image_size)
    want = (dataset.channels, dataset.image_size)
    if got != want:
        raise ValueError(
            f"samples {store.url(samples.key)} are (channels, size) = {got} but dataset "
            f"{dataset.dataset!r} holds {want}; evaluate samples of a model trained on this dataset"
        )
    images = _read_images_checked(
        store, [s.key for s in samples.shards], dataset.channels, samples.num_images
    )

    problems = sample_problems(images)
    for problem in problems:
        log.warning("sample set %s: %s", store.url(samples.key), problem)
    extractor = extractor or resolve_extractor(cfg, store, cache_dir=cache_dir)
    features = extract_features(images, extractor, cfg.batch_size, device)
    scores: dict[str, float | int | str] = {}
    if "fid" in cfg.metrics or "kid" in cfg.metrics:
        ref = reference_features(store, dataset, extractor, cfg, device)
        scores |= {"num_reference_images": ref.count, "reference_stats_key": ref.key}
        if "fid" in cfg.metrics:
            scores["fid"] = frechet_distance(*feature_moments(features["2048"]), ref.mu, ref.sigma)
        if "kid" in cfg.metrics:
            subset_size = min(cfg.kid_subset_size, len(images), ref.count)
            if subset_size < cfg.kid_subset_size:
                log.warning(
                    "KID subset size lowered from %d to %d (number of images)",
                    cfg.kid_subset_size,
                    subset_size,
                )
            mean, std = kernel_inception_distance(
                features["2048"], ref.features, subset_size, KID_SUBSETS, seed=2020
            )
            scores |= {
                "kid_mean": mean,
                "kid_std": std,
                "kid_subset_size": subset_size,
                "kid_subsets": KID_SUBSETS,
            }
    if "isc" in cfg.metrics:
        isc = isc_features_to_metric(
            torch.from_numpy(features["logits_unbiased"]),
            splits=min(ISC_SPLITS, len(images)),
            shuffle=True,
            rng_seed=2020,
        )
        scores |= {
            "isc_mean": float(isc[KEY_METRIC_ISC_MEAN]),
            "isc_std": float(isc[KEY_METRIC_ISC_STD]),
        }

    metrics = Metrics.model_validate(
        {
            **scores,
            "run_id": samples.run_id,
            "sample_set": samples.name,
            "samples_key": samples.key,
            "checkpoint_key": samples.checkpoint.key,
            "checkpoint_step": samples.checkpoint.step,
            "sampling": samples.config,
            "num_images": len(images),
            "dataset_fingerprint": dataset.fingerprint,
            "extractor": extractor.to_record(),
            "problems": problems + [f"{k} is {v}" for k, v in scores.items() if _non_finite(v)],
            "created": _now(),
        }
    )
    report = report_markdown(metrics)
    store.write_bytes(metrics.grid_key, encode_png(make_grid(images[: cfg.grid_images])))
    store.write_text(metrics.report_key, report)
    metrics.write(store, metrics.key)
    log.info(
        "evaluation written to %s: fid=%s kid=%s",
        store.url(metrics.prefix),
        metrics.fid,
        metrics.kid_mean,
    )
    return Evaluation(metrics=metrics, report_markdown=report)
