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
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from diffusion_core.fid import (
    feature_moments,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from tasks.config import EvalConfig
from tasks.inception import (  # noqa: F401 (re-exported: the extractor API belongs to this stage)
    STANDARD_FILENAME,
    STANDARD_WEIGHTS_URL,
    ExtractorInfo,
    extract_features,
    load_extractor,
    resolve_extractor,
)
from tasks.sample import SAMPLES_FORMAT
from tasks.shard import MANIFEST_FORMAT as DATASET_FORMAT
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


def reference_stats_key(fingerprint: str, extractor_sha256: str, count: int) -> str:
    if not re.fullmatch(r"[0-9a-zA-Z_-]+", fingerprint):
        raise ValueError(f"dataset fingerprint {fingerprint!r} is not a plain identifier")
    return f"stats/{fingerprint}/{extractor_sha256[:16]}-n{count}.npz"


def _read_stats(store: Store, key: str, meta_expected: dict[str, Any]) -> ReferenceStats | None:
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
    manifest: dict[str, Any],
    extractor: ExtractorInfo,
    cfg: EvalConfig,
    device: str = "cpu",
) -> ReferenceStats:
    """Features of the held-out split, computed once per (dataset fingerprint, extractor, count) and
    cached in the store at `stats/<fingerprint>/<extractor sha256[:16]>-n<count>.npz`."""
    if manifest.get("format") != DATASET_FORMAT:
        raise ValueError(
            f"dataset manifest format {manifest.get('format')!r} is not {DATASET_FORMAT!r}"
        )
    holdout = manifest["splits"]["holdout"]
    count = (
        holdout["count"]
        if cfg.max_reference_images is None
        else min(holdout["count"], cfg.max_reference_images)
    )
    fingerprint = manifest["fingerprint"]
    key = reference_stats_key(fingerprint, extractor.sha256, count)
    meta = {
        "count": count,
        "extractor_sha256": extractor.sha256,
        "dataset_fingerprint": fingerprint,
    }
    cached = _read_stats(store, key, meta)
    if cached is not None:
        log.info("reference stats from cache %s", store.url(key))
        return cached

    images, _, _ = _read_images_checked(
        store, [s["key"] for s in holdout["shards"]], manifest["channels"], count
    )
    features = extract_features(images, extractor, cfg.batch_size, device)["2048"]
    mu, sigma = feature_moments(features)
    stored = features.astype(np.float32)
    meta |= {
        "extractor_label": extractor.label,
        "dataset": manifest.get("dataset"),
        "created": _now(),
    }
    buf = io.BytesIO()
    np.savez(buf, features=stored, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    store.write_bytes(key, buf.getvalue())
    log.info("reference stats of %d held-out images written to %s", count, store.url(key))
    return ReferenceStats(key, stored, mu, sigma, count, computed=True)


def _read_images_checked(
    store: Store, keys: list[str], channels: int, limit: int | None
) -> tuple[np.ndarray, list[int | None], list[dict[str, Any]]]:
    """`read_images`, checking that the shards hold at least what the manifest promises."""
    images, labels, metas = read_images(store, keys, channels, limit)
    if limit is not None and len(images) < limit:
        raise ValueError(f"shards {keys} hold {len(images)} images, the manifest promises {limit}")
    return images, labels, metas


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


def _report_markdown(metrics: dict[str, Any]) -> str:
    extractor = metrics["extractor"]
    lines = [
        f"# Sample evaluation: run `{metrics['run_id']}`, step {metrics['checkpoint_step']}",
        "",
    ]
    if not extractor["standard"]:
        lines += [
            f"> **WARNING: FID computed with a stand-in extractor ({extractor['label']}); "
            "these numbers are NOT comparable with published FIDs.** Compare them only with runs "
            f"that report the same extractor sha256 `{extractor['weights_sha256'][:16]}`.",
            "",
        ]
    lines += ["| metric | value |", "|---|---|"]
    for name in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std"):
        if name in metrics:
            lines.append(f"| {name} | {metrics[name]:.6g} |")
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    for name in (
        "sampler",
        "steps",
        "eta",
        "guidance_scale",
        "checkpoint_step",
        "num_images",
        "num_reference_images",
        "kid_subset_size",
        "kid_subsets",
        "dataset_fingerprint",
        "reference_stats_key",
        "created",
    ):
        if name in metrics:
            lines.append(f"| {name} | `{metrics[name]}` |")
    lines.append(
        f"| extractor | {extractor['label']}, weights sha256 `{extractor['weights_sha256']}` |"
    )
    lines += ["", "## Samples", "", "![samples](grid.png)", ""]
    return "\n".join(lines)


def evaluate_samples(
    store: Store,
    dataset_manifest: dict[str, Any],
    samples_manifest_key: str,
    cfg: EvalConfig,
    out_prefix: str,
    device: str = "cpu",
    *,
    cache_dir: Path | None = None,
    extractor: ExtractorInfo | None = None,
) -> dict[str, Any]:
    """Score the sample set at `samples_manifest_key` against the held-out split of the dataset.

    Writes `<out_prefix>/grid.png`, `report.md` and, last, `metrics.json` (each atomically), and
    returns the metrics with the keys of the written files. `extractor` skips resolution (a flow
    resolves once and scores many sample sets); by default `resolve_extractor(cfg, store)`.
    """
    samples_manifest = store.read_json(samples_manifest_key)
    if samples_manifest.get("format") != SAMPLES_FORMAT:
        raise ValueError(
            f"{store.url(samples_manifest_key)} has format {samples_manifest.get('format')!r}, "
            f"expected {SAMPLES_FORMAT!r}"
        )
    got = (samples_manifest.get("channels"), samples_manifest.get("image_size"))
    want = (dataset_manifest["channels"], dataset_manifest["image_size"])
    if got != want:
        raise ValueError(
            f"samples {store.url(samples_manifest_key)} are (channels, size) = {got} but dataset "
            f"{dataset_manifest.get('dataset')!r} holds {want}; evaluate samples of a model "
            "trained on this dataset"
        )
    channels = dataset_manifest["channels"]
    images, _, _ = _read_images_checked(
        store,
        [s["key"] for s in samples_manifest["shards"]],
        channels,
        samples_manifest["num_images"],
    )
    if images.shape[1:] != (channels, want[1], want[1]):
        raise ValueError(
            f"sample images have shape {images.shape[1:]}, "
            f"the manifests say {(channels, want[1], want[1])}"
        )

    extractor = extractor or resolve_extractor(cfg, store, cache_dir=cache_dir)
    features = extract_features(images, extractor, cfg.batch_size, device)
    metrics: dict[str, Any] = {"num_images": len(images)}
    if "fid" in cfg.metrics or "kid" in cfg.metrics:
        ref = reference_features(store, dataset_manifest, extractor, cfg, device)
        metrics |= {"num_reference_images": ref.count, "reference_stats_key": ref.key}
        if "fid" in cfg.metrics:
            metrics["fid"] = frechet_distance(*feature_moments(features["2048"]), ref.mu, ref.sigma)
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
            metrics |= {
                "kid_mean": mean,
                "kid_std": std,
                "kid_subset_size": subset_size,
                "kid_subsets": KID_SUBSETS,
            }
    if "isc" in cfg.metrics:
        mean, std = inception_score(
            features["logits_unbiased"], splits=min(ISC_SPLITS, len(images))
        )
        metrics |= {"isc_mean": mean, "isc_std": std}

    settings = ("sampler", "steps", "eta", "guidance_scale", "checkpoint_step", "run_id")
    metrics |= {name: samples_manifest.get(name) for name in settings}
    metrics |= {
        "extractor": extractor.to_dict(),
        "comparable_with_published": extractor.standard,
        "dataset_fingerprint": dataset_manifest["fingerprint"],
        "samples_manifest_key": samples_manifest_key,
        "created": _now(),
    }
    prefix = out_prefix.strip("/")
    files = {
        "grid_key": f"{prefix}/grid.png",
        "report_key": f"{prefix}/report.md",
        "metrics_key": f"{prefix}/metrics.json",
    }
    metrics |= files
    store.write_bytes(files["grid_key"], encode_png(make_grid(images[: cfg.grid_images])))
    store.write_text(files["report_key"], _report_markdown(metrics))
    store.write_json(files["metrics_key"], metrics)
    log.info(
        "evaluation written to %s: %s",
        store.url(prefix),
        {k: metrics[k] for k in ("fid", "kid_mean", "isc_mean") if k in metrics},
    )
    return metrics
