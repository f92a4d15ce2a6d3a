"""Evaluate a sample set: FID/KID/IS against the held-out split, with a labelled feature extractor.

The extractor is torch-fidelity's InceptionV3 ("inception-v3-compat"), resolved in
`tasks.evaluate.inception`: the standard weights make FIDs comparable with published ones; a seeded stand-in
keeps the pipeline running offline, and every artifact then says that its numbers are NOT
comparable with published FIDs.

The work is shard by shard (`tasks.evaluate.features`): workers stream each sample shard through the
extractor, keep its features in the store and return their exact moments; this driver adds the
moments of each repeat up and computes its FID, so its memory does not grow with the number of
images. With `evaluate.repeats = k` every repeat (a disjoint seed range of `num_images`) is scored
on its own; the metrics carry each FID, their mean and their standard deviation.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch_fidelity

from diffusion_core.fid import FeatureMoments, feature_moments, frechet_distance
from tasks import layout
from tasks.config import EvalConfig
from tasks.evaluate.features import (
    KID_SUBSETS,
    FeatureWorker,
    ImageChecks,
    LocalPool,
    RepeatScores,
    ScoreJob,
    ShardFeatures,
    ShardJob,
    WorkerPool,
)
from tasks.evaluate.inception import ExtractorInfo, resolve_extractor
from tasks.jobs import Progress
from tasks.records import DatasetManifest, Evaluation, Metrics, Provenance, SampleSet
from tasks.storage import Store
from tasks.webdata import encode_png, read_images

log = logging.getLogger(__name__)


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
    pool: WorkerPool | None = None,
) -> ReferenceStats:
    """Features of the held-out split, computed once per (dataset fingerprint, extractor, count) and
    cached in the store at `stats/<fingerprint>/<extractor sha256[:16]>-n<count>.npz`; the shards
    are extracted in parallel on `pool` (default: this process)."""
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

    jobs: list[ShardJob] = []
    left = count
    for shard in holdout.shards:
        if left <= 0:
            break
        take = min(shard.count, left)
        jobs.append(ShardJob(len(jobs), shard.key, take, shard.sha256, features_key=None))
        left -= take
    if left > 0:
        raise ValueError(
            f"the held-out shards of {store.url(manifest.key)} hold {count - left} images, "
            f"the manifest promises {count}; rerun the shard stage"
        )
    pool = pool or LocalPool(FeatureWorker(store.config, cfg, extractor, manifest.channels))
    progress = Progress("reference features", count)
    parts: dict[int, np.ndarray] = {}
    for result in pool.map_shards(jobs):
        assert result.features is not None
        parts[result.index] = result.features
        progress.update(result.count)
    stored = np.concatenate([parts[n] for n in range(len(jobs))]).astype(np.float32)
    mu, sigma = feature_moments(stored)
    meta |= {"extractor_label": extractor.label, "dataset": manifest.dataset, "created": _now()}
    buf = io.BytesIO()
    np.savez(buf, features=stored, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    store.write_bytes(key, buf.getvalue())
    log.info("reference stats of %d held-out images written to %s", count, store.url(key))
    return ReferenceStats(key, stored, mu, sigma, count, computed=True)


def _non_finite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1): the spread of a metric over repeats; None for one."""
    return statistics.stdev(values) if len(values) > 1 else None


def _git_commit() -> str | None:
    """The checkout's commit (with `-dirty` when tracked files differ from it); None outside git
    (an installed wheel, Ray's py_modules copy, an image without .git)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--"], cwd=here, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")


def provenance(devices: set[str]) -> Provenance:
    """What produced an evaluation: package version and git commit, torch, torch-fidelity, and the
    device kind(s) the features were extracted on."""
    try:
        package = version("diffusion-pipeline")
    except PackageNotFoundError:
        package = "unknown"
    return Provenance(
        package_version=package,
        git_commit=_git_commit(),
        torch=torch.__version__,
        torch_fidelity=str(torch_fidelity.__version__),
        device=", ".join(sorted(devices)) or "cpu",
    )


# -- the report ----------------------------------------------------------------------------------
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


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.6g} ± {std:.2g}" if std is not None else f"{mean:.6g}"


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
    k = metrics.repeats
    noise = (
        f"mean ± sample std over {k} repeats of {metrics.num_images} images (disjoint seeds)"
        if k > 1
        else f"one seed range of {metrics.num_images} images: its noise is not measured "
        "(set evaluate.repeats=3 to measure it)"
    )
    lines += [f"Metrics: {noise}.", "", "| metric | value |", "|---|---|"]
    values = {
        "fid": _pm(metrics.fid, metrics.fid_std),
        "kid_mean": _pm(metrics.kid_mean, metrics.kid_mean_std),
        "kid_std (within a repeat, over subsets)": _pm(metrics.kid_std, None),
        "isc_mean": _pm(metrics.isc_mean, None),
        "isc_std": _pm(metrics.isc_std, None),
    }
    lines += [f"| {name} | {v} |" for name, v in values.items() if v != "n/a"]
    ranges = metrics.seed_ranges or [(0, 0)] * len(metrics.fids)
    if metrics.fids:
        lines += ["", "| repeat | seeds | FID | KID |", "|---|---|---|---|"]
        kids: list[float | None] = list(metrics.kids) or [None] * len(metrics.fids)
        for j, (fid, kid, (a, b)) in enumerate(zip(metrics.fids, kids, ranges, strict=False)):
            kid_text = "n/a" if kid is None else f"{kid:.6g}"
            lines.append(f"| {j + 1} | {a}..{b - 1} | {fid:.6g} | {kid_text} |")
    sc = metrics.sampling
    seeds = ", ".join(f"{a}..{b - 1}" for a, b in metrics.seed_ranges) or "?"
    settings: dict[str, object] = {
        "sampler": sc.sampler,
        "steps": sc.steps,
        "spacing": sc.spacing,
        "eta": sc.eta,
        "guidance_scale": sc.guidance_scale,
        "weights": metrics.weights,
        "seeds": seeds,
        "repeats": metrics.repeats,
        "checkpoint_step": metrics.checkpoint_step,
        "num_images": f"{metrics.num_images} per repeat",
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
    p = metrics.provenance
    if p is not None:
        lines += [
            "",
            "## Provenance",
            "",
            "| what | value |",
            "|---|---|",
            f"| diffusion-pipeline | `{p.package_version}` |",
            f"| git commit | `{p.git_commit or 'unknown (not a git checkout)'}` |",
            f"| torch | `{p.torch}` |",
            f"| torch-fidelity | `{p.torch_fidelity}` |",
            f"| device | `{p.device}` |",
        ]
    grid_name = posixpath.basename(metrics.grid_key)  # the report sits beside its grid
    lines += ["", "## Samples", "", f"![samples]({grid_name})", ""]
    return "\n".join(lines)


# -- the task ------------------------------------------------------------------------------------
def _sample_jobs(samples: SampleSet, repeats: int, sha256: str) -> list[tuple[int, ShardJob]]:
    """(repeat, job) for every shard of the first `repeats` repeats."""
    index = {s.key: n for n, s in enumerate(samples.shards)}
    jobs = []
    for j in range(repeats):
        for shard in samples.repeat_shards(j):
            n = index[shard.key]
            key = layout.sample_features(samples.prefix, sha256, n)
            jobs.append((j, ShardJob(n, shard.key, shard.count, shard.sha256, key)))
    return jobs


def _problems(checks: list[ImageChecks], total: int) -> list[str]:
    """A degenerate sample set whatever its FID: every image flat (one value, e.g. the black
    images of a diverged model), or every image the same."""
    if sum(c.flat for c in checks) == total:
        return [f"all {total} samples are flat images (a single pixel value each)"]
    firsts = {c.first_image for c in checks}
    if total > 1 and len(firsts) == 1 and all(c.all_same for c in checks):
        return [f"all {total} samples are the same image"]
    return []


@dataclass
class _Merged:
    """The driver's whole state of an extraction: one moment sum per repeat (2 x 2048^2 float64
    numbers), not the shards' results, so it does not grow with the number of shards."""

    moments: list[FeatureMoments | None]
    checks: list[ImageChecks]
    devices: set[str]


def _merge(
    results: Iterator[ShardFeatures], repeat_of: dict[int, int], repeats: int, progress: Progress
) -> _Merged:
    merged = _Merged([None] * repeats, [], set())
    for result in results:
        j = repeat_of[result.index]
        previous = merged.moments[j]
        merged.moments[j] = result.moments if previous is None else previous + result.moments
        merged.checks.append(result.checks)
        merged.devices.add(result.device)
        if result.reused:
            progress.skip(result.count)
        else:
            progress.update(result.count)
    return merged


def evaluate_samples(
    store: Store,
    dataset: DatasetManifest,
    samples: SampleSet,
    cfg: EvalConfig,
    *,
    pool: WorkerPool | None = None,
    cache_dir: Path | None = None,
    extractor: ExtractorInfo | None = None,
) -> Evaluation:
    """Score the sample set `samples` against the held-out split of `dataset`.

    The shards are extracted on `pool` (`tasks.evaluate.stage` passes a pool of Ray actors; by
    default this process). Writes `grid.png`, `report.md` and, last, `metrics.json` (each
    atomically) to the set's evaluation folder. `extractor` skips resolution (a flow resolves once
    and scores many sample sets); by default `resolve_extractor(cfg, store)`.
    """
    got = (samples.channels, samples.image_size)
    want = (dataset.channels, dataset.image_size)
    if got != want:
        raise ValueError(
            f"samples {store.url(samples.key)} are (channels, size) = {got} but dataset "
            f"{dataset.dataset!r} holds {want}; evaluate samples of a model trained on this dataset"
        )
    k = cfg.repeats
    if samples.repeats < k:
        raise ValueError(
            f"evaluate.repeats={k} needs {k} seed ranges, but sample set {store.url(samples.key)} "
            f"holds {samples.repeats}; sample with the same evaluate.repeats first"
        )
    extractor = extractor or resolve_extractor(cfg, store, cache_dir=cache_dir)
    pool = pool or LocalPool(FeatureWorker(store.config, cfg, extractor, dataset.channels))

    jobs = _sample_jobs(samples, k, extractor.sha256)
    repeat_of = {job.index: j for j, job in jobs}
    total = k * samples.num_images
    merged = _merge(
        pool.map_shards([job for _, job in jobs]),
        repeat_of,
        k,
        Progress("extracting features", total),
    )
    problems = _problems(merged.checks, total)
    for problem in problems:
        log.warning("sample set %s: %s", store.url(samples.key), problem)

    scores: dict[str, object] = {}
    fids: list[float] = []
    per_repeat: list[RepeatScores] = []
    ref: ReferenceStats | None = None
    if "fid" in cfg.metrics or "kid" in cfg.metrics:
        ref = reference_features(store, dataset, extractor, cfg, pool)
        scores |= {"num_reference_images": ref.count, "reference_stats_key": ref.key}
    if "fid" in cfg.metrics:
        assert ref is not None
        for m in merged.moments:
            assert m is not None
            fids.append(frechet_distance(*m.mean_cov(), ref.mu, ref.sigma))
        scores |= {"fid": _mean(fids), "fids": fids, "fid_std": _std(fids)}
    kid = "kid" in cfg.metrics
    subset_size = min(cfg.kid_subset_size, samples.num_images, ref.count if ref else 0)
    if kid and subset_size < cfg.kid_subset_size:
        log.warning(
            "KID subset size lowered from %d to %d (number of images)",
            cfg.kid_subset_size,
            subset_size,
        )
    if kid or "isc" in cfg.metrics:
        score_jobs = [
            ScoreJob(
                repeat=j,
                features_keys=tuple(job.features_key or "" for r, job in jobs if r == j),
                reference_key=ref.key if ref is not None else None,
                kid_subset_size=subset_size,
                kid=kid,
                isc="isc" in cfg.metrics,
            )
            for j in range(k)
        ]
        per_repeat = sorted(pool.scores(score_jobs), key=lambda s: s.repeat)
    if kid:
        kids = [float(s.kid_mean) for s in per_repeat if s.kid_mean is not None]
        scores |= {
            "kids": kids,
            "kid_mean": _mean(kids),
            "kid_mean_std": _std(kids),
            "kid_std": _mean([float(s.kid_std) for s in per_repeat if s.kid_std is not None]),
            "kid_subset_size": subset_size,
            "kid_subsets": KID_SUBSETS,
        }
    if "isc" in cfg.metrics:
        scores |= {
            "isc_mean": _mean([float(s.isc_mean) for s in per_repeat if s.isc_mean is not None]),
            "isc_std": _mean([float(s.isc_std) for s in per_repeat if s.isc_std is not None]),
        }

    bad = [
        f"{name} is {value}"
        for name, value in scores.items()
        if _non_finite(value) or (isinstance(value, list) and any(map(_non_finite, value)))
    ]
    metrics = Metrics.model_validate(
        {
            **scores,
            "run_id": samples.run_id,
            "sample_set": samples.name,
            "samples_key": samples.key,
            "checkpoint_key": samples.checkpoint.key,
            "checkpoint_step": samples.checkpoint.step,
            "sampling": samples.config,
            "num_images": samples.num_images,
            "repeats": k,
            "seed_ranges": samples.seed_ranges()[:k],
            "weights": samples.weights,
            "dataset_fingerprint": dataset.fingerprint,
            "extractor": extractor.to_record(),
            "provenance": provenance(merged.devices),
            "problems": problems + bad,
            "created": _now(),
        }
    )
    report = report_markdown(metrics)
    first = samples.repeat_shards(0)
    grid_images, _ = read_images(
        store, [s.key for s in first], dataset.channels, min(cfg.grid_images, samples.num_images)
    )
    store.write_bytes(metrics.grid_key, encode_png(make_grid(grid_images)))
    store.write_text(metrics.report_key, report)
    metrics.write(store, metrics.key)
    log.info(
        "evaluation written to %s: fid=%s (%s) kid=%s",
        store.url(metrics.prefix),
        metrics.fid,
        "one repeat" if k == 1 else f"± {metrics.fid_std} over {k} repeats",
        metrics.kid_mean,
    )
    return Evaluation(metrics=metrics, report_markdown=report)
