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

import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from diffusion_core.fid import (
    feature_moments,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)
from tasks.config import EvalConfig
from tasks.storage import Store
from tasks.webdata import encode_png, read_images

log = logging.getLogger(__name__)

STANDARD_WEIGHTS_URL = URL_INCEPTION_V3
STANDARD_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]
# torch.hub's naming convention: the 8 hex digits before the extension are the sha256 prefix of
# the file (`load_state_dict_from_url(check_hash=True)` checks exactly this). The full digest is
# published nowhere we can pin, so the prefix is the check.
STANDARD_SHA256_PREFIX = "6726825d"
STANDARD_STORE_KEY = f"extractors/{STANDARD_FILENAME}"
DOWNLOAD_TIMEOUT_S = 20.0
FEATURES = ("2048", "logits_unbiased")
KID_SUBSETS = 100
ISC_SPLITS = 10
SAMPLES_FORMAT = "diffusion-pipeline/samples@1"
DATASET_FORMAT = "diffusion-pipeline/dataset@1"


@dataclass(frozen=True)
class ExtractorInfo:
    """A resolved feature extractor: its weights file on local disk and what it is."""

    path: Path
    sha256: str
    standard: bool
    label: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "weights_sha256": self.sha256,
            "standard": self.standard,
            "source": self.source,
        }


# -- weights: where they come from --------------------------------------------------------------
def default_cache_dir() -> Path:
    """torch.hub's checkpoint folder, where torch-fidelity's own download lands too."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _download(url: str, dst: Path, timeout: float) -> None:
    """Plain HTTP(S) download with a socket timeout (torch.hub's has none and can hang offline)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    _write_local_atomic(dst, data)


def _describe(path: Path, source: str) -> ExtractorInfo:
    sha = _file_sha256(path)
    standard = sha.startswith(STANDARD_SHA256_PREFIX)
    if standard:
        label = "inception-v3-compat (standard weights)"
    else:
        label = (
            f"inception-v3-compat custom weights sha256={sha[:16]} "
            "(not comparable with published FID)"
        )
    return ExtractorInfo(path=path, sha256=sha, standard=standard, label=label, source=source)


def _fetch_configured(location: str, store: Store, cache: Path) -> tuple[Path, str]:
    """`evaluate.inception_weights` -> a local file.

    Accepts a path, a file:// URL, the store's (or another fsspec) URL, or an http(s) URL.
    """
    scheme = location.split("://", 1)[0] if "://" in location else ""
    if scheme in ("", "file"):
        path = Path(location[len("file://") :] if scheme else location).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.inception_weights={location!r}: no such file")
        return path, location
    name = location.rstrip("/").rsplit("/", 1)[-1] or "inception-weights.pth"
    if scheme in ("http", "https"):
        dst = cache / name
        if not dst.is_file():
            log.info("downloading Inception weights %s", location)
            _download(location, dst, DOWNLOAD_TIMEOUT_S)
        return dst, location
    fs = store.fs if scheme == store.protocol else fsspec.filesystem(scheme)
    try:
        data = fs.cat_file(location)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"evaluate.inception_weights={location!r}: no such object"
        ) from None
    dst = cache / f"{hashlib.sha256(data).hexdigest()[:16]}-{name}"
    if not dst.is_file():
        _write_local_atomic(dst, data)
    return dst, location


def _find_standard(store: Store, cache: Path, url: str) -> tuple[Path | None, str, str]:
    """Standard weights from the local cache, the store or `url`: (path or None, source, reason)."""
    local = cache / STANDARD_FILENAME
    if local.is_file() and _file_sha256(local).startswith(STANDARD_SHA256_PREFIX):
        return local, str(local), ""
    if store.exists(STANDARD_STORE_KEY):
        _write_local_atomic(local, store.read_bytes(STANDARD_STORE_KEY))
        return local, store.url(STANDARD_STORE_KEY), ""
    try:
        _download(url, local, DOWNLOAD_TIMEOUT_S)
    except OSError as err:  # URLError, timeouts, refused connections
        return None, url, f"download of {url} failed: {err}"
    if not _file_sha256(local).startswith(STANDARD_SHA256_PREFIX):
        local.unlink()
        return (
            None,
            url,
            f"{url} did not serve the standard file "
            f"(its sha256 does not start with {STANDARD_SHA256_PREFIX})",
        )
    return local, url, ""


def _missing_weights_message(reason: str, store: Store) -> str:
    return (
        f"the standard FID Inception weights are not available ({reason}). "
        f"On a machine with internet, download {STANDARD_WEIGHTS_URL} "
        f"(its sha256 starts with {STANDARD_SHA256_PREFIX}); then either put the file where every "
        "worker can read it and set evaluate.inception_weights=PATH, or upload it to the object "
        f"store as {store.url(STANDARD_STORE_KEY)} (found there automatically; an s3:// URL in "
        "evaluate.inception_weights works too). To go on without them, set "
        "evaluate.on_missing_weights=stand-in: the FID is then computed with a seeded stand-in "
        "extractor and is not comparable with published FIDs."
    )


def resolve_extractor(
    cfg: EvalConfig,
    store: Store,
    *,
    cache_dir: Path | None = None,
    standard_url: str = STANDARD_WEIGHTS_URL,
) -> ExtractorInfo:
    """Find the extractor weights.

    Order: `cfg.inception_weights`; else the standard weights from the local cache, the store's
    `extractors/` or `standard_url` (20 s timeout); else, per `cfg.on_missing_weights`, a
    RuntimeError saying how to provide them or the seeded stand-in (loudly logged).
    """
    cache = cache_dir or default_cache_dir()
    if cfg.inception_weights:
        return _describe(*_fetch_configured(cfg.inception_weights, store, cache))
    path, source, reason = _find_standard(store, cache, standard_url)
    if path is not None:
        return _describe(path, source)
    if cfg.on_missing_weights == "error":
        raise RuntimeError(_missing_weights_message(reason, store))
    log.warning(
        "!!! standard FID Inception weights unavailable (%s): using a seeded STAND-IN "
        "extractor (seed=%d). FID/KID/IS from it are NOT comparable with published numbers. %s",
        reason,
        cfg.standin_seed,
        "Set evaluate.inception_weights to fix this.",
    )
    return _standin(cfg.standin_seed, store, cache)


# -- the network --------------------------------------------------------------------------------
class _InceptionV3Compat(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 (same layers, same forward) without its unsafe loader.

    Its constructor `torch.load`s the weights with weights_only=False; we give it an empty
    checkpoint serialized here, skip that load, and load the real weights afterwards, safely.
    """

    def __init__(self) -> None:
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        super().__init__(
            "inception-v3-compat", list(FEATURES), feature_extractor_weights_path=empty
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if not state_dict:  # the constructor's empty checkpoint; a real load is strict below
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def load_weights_safely(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict of tensors via torch.load(weights_only=True); anything else is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not a plain tensor checkpoint
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"refusing Inception weights file {str(path)!r}: it is not a plain tensor checkpoint "
            f"that torch.load(weights_only=True) accepts ({type(err).__name__}: {first_line})"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    ):
        raise ValueError(
            f"refusing Inception weights file {str(path)!r}: expected a state_dict of tensors, "
            f"got {type(obj).__name__}"
        )
    return obj


@functools.lru_cache(maxsize=2)
def _load_extractor(path: str, sha256: str, device: str) -> _InceptionV3Compat:
    del sha256  # part of the cache key only: same bytes, same module
    model = _InceptionV3Compat()
    try:
        model.load_state_dict(load_weights_safely(Path(path)))
    except RuntimeError as err:
        raise ValueError(
            f"Inception weights file {path!r} does not fit torch-fidelity's InceptionV3: {err}"
        ) from None
    return model.to(device).eval()


def load_extractor(info: ExtractorInfo, device: str = "cpu") -> torch.nn.Module:
    """The extractor module for `info`, built once per process and device."""
    return _load_extractor(str(info.path), info.sha256, str(device))


def _standin_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """He-initialised InceptionV3 weights from one seed; BatchNorm at identity.

    PyTorch's default init (kaiming_uniform with a=sqrt(5), i.e. gain 1/sqrt(3)) shrinks the
    activations by ~3x per conv; over InceptionV3's depth the pool features vanish and every FID is
    ~1e-13. He init (fan_in, ReLU gain) keeps the activation scale through the depth.
    """
    model = _InceptionV3Compat()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                torch.nn.init.kaiming_normal_(
                    module.weight, mode="fan_in", nonlinearity="relu", generator=g
                )
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _standin(seed: int, store: Store, cache: Path) -> ExtractorInfo:
    """The stand-in lives in the store: every worker and run uses the same bytes and sha256."""
    key = f"extractors/inception-v3-standin-seed{seed}.pth"
    sha_key = key + ".sha256"
    known_sha = store.read_bytes(sha_key).decode().strip() if store.exists(sha_key) else None
    if known_sha:
        local = cache / f"inception-v3-standin-seed{seed}-{known_sha[:16]}.pth"
        if local.is_file() and _file_sha256(local) == known_sha:
            return _standin_info(local, known_sha, seed, store.url(key))
    if store.exists(key):
        data = store.read_bytes(key)
    else:
        log.info(
            "building the stand-in extractor (seed=%d) and caching it at %s", seed, store.url(key)
        )
        buf = io.BytesIO()
        torch.save(_standin_state_dict(seed), buf)
        data = buf.getvalue()
        store.write_bytes(key, data)
    sha = hashlib.sha256(data).hexdigest()
    if sha != known_sha:
        store.write_text(sha_key, sha + "\n")
    local = cache / f"inception-v3-standin-seed{seed}-{sha[:16]}.pth"
    if not local.is_file():
        _write_local_atomic(local, data)
    return _standin_info(local, sha, seed, store.url(key))


def _standin_info(path: Path, sha: str, seed: int, source: str) -> ExtractorInfo:
    label = f"inception-v3-compat STAND-IN seed={seed} (not comparable with published FID)"
    return ExtractorInfo(path=path, sha256=sha, standard=False, label=label, source=source)


# -- features and statistics ---------------------------------------------------------------------
def extract_features(
    images_uint8: np.ndarray, extractor: ExtractorInfo, batch_size: int, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """uint8 [N, C, H, W], C in (1, 3) -> {"2048": [N, 2048], "logits_unbiased": [N, 1008]} float64.

    The extractor resizes to 299x299 itself (TF1-compatible bilinear); grayscale is repeated to RGB.
    """
    if (
        images_uint8.dtype != np.uint8
        or images_uint8.ndim != 4
        or images_uint8.shape[1] not in (1, 3)
    ):
        raise ValueError(
            "extract_features needs uint8 [N, C, H, W] with C in (1, 3), "
            f"got {images_uint8.dtype} {images_uint8.shape}"
        )
    model = load_extractor(extractor, device)
    out: dict[str, list[np.ndarray]] = {name: [] for name in FEATURES}
    start = time.monotonic()
    with torch.inference_mode():
        for lo in range(0, len(images_uint8), batch_size):
            x = torch.from_numpy(np.array(images_uint8[lo : lo + batch_size], copy=True)).to(device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            for name, value in zip(FEATURES, model(x), strict=True):
                out[name].append(value.double().cpu().numpy())
    log.info(
        "extracted features of %d images in %.1fs", len(images_uint8), time.monotonic() - start
    )
    return {name: np.concatenate(parts) for name, parts in out.items()}


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
