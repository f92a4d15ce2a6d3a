"""Score a sample set: FID/KID/IS of each repeat against the held-out split, with a labelled
feature extractor.

The extractor is torch-fidelity's InceptionV3 ("inception-v3-compat"), resolved in
`tasks.evaluate.inception`: the standard weights make FIDs comparable with published ones; a seeded
stand-in keeps the pipeline running offline, and every artifact then says that its numbers are NOT
comparable with published FIDs.

The work is shard by shard (`tasks.evaluate.features`): workers stream each sample shard through the
extractor, keep its features in the store and return their exact moments; this driver adds the
moments of each repeat up and computes its FID, so its memory does not grow with the number of
images. With `evaluate.repeats = k` every repeat (a disjoint seed range of `num_images`) is scored
on its own; the metrics carry each FID, their mean and their standard deviation. One function per
metric family returns that family's fields of the `Metrics` record.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

from diffusion_core.fid import FeatureMoments, frechet_distance
from tasks import layout
from tasks.config import EvalConfig
from tasks.evaluate.dinov2 import DinoFields, fd_dinov2_fields, skip_reason
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
from tasks.evaluate.inception import ExtractorInfo, provenance, resolve_extractor
from tasks.evaluate.neighbours import memorization_threshold
from tasks.evaluate.reference import ReferenceStats, reference_features
from tasks.evaluate.training import TrainingFeatures, training_features
from tasks.jobs import Progress
from tasks.records import METRICS, DatasetManifest, Metrics, MetricSample, SampleSet
from tasks.storage import Store

log = logging.getLogger(__name__)


# -- the metric families: each returns its fields of `Metrics` (absent when not measured) ---------
class FidFields(TypedDict, total=False):
    fid: float | None  # mean over the repeats
    fids: list[float]
    fid_std: float | None


class KidFields(TypedDict, total=False):
    kids: list[float]
    kid_mean: float | None
    kid_mean_std: float | None
    kid_std: float | None  # within a repeat, over subsets (mean over the repeats)
    kid_subset_size: int | None
    kid_subsets: int | None


class IscFields(TypedDict, total=False):
    isc_mean: float | None
    isc_std: float | None


class NeighbourFields(TypedDict, total=False):
    precisions: list[float]
    recalls: list[float]
    precision: float | None
    recall: float | None
    memorized_shares: list[float]
    memorized_share: float | None
    memorization_threshold: float | None
    memorization_quantile: float | None
    num_training_images: int | None


def neighbour_fields(
    per_repeat: list[RepeatScores],
    cfg: EvalConfig,
    train: TrainingFeatures | None,
    threshold: float | None,
) -> NeighbourFields:
    """Precision, recall and the memorized share of each repeat, and their means."""
    fields = NeighbourFields()
    if "prc" in cfg.metrics:
        precisions = [s.precision for s in per_repeat if s.precision is not None]
        recalls = [s.recall for s in per_repeat if s.recall is not None]
        fields |= NeighbourFields(
            precisions=precisions,
            recalls=recalls,
            precision=_mean(precisions),
            recall=_mean(recalls),
        )
    if train is not None:
        shares = [s.memorized_share for s in per_repeat if s.memorized_share is not None]
        fields |= NeighbourFields(
            memorized_shares=shares,
            memorized_share=_mean(shares),
            memorization_threshold=threshold,
            memorization_quantile=cfg.memorization_quantile,
            num_training_images=train.count,
        )
    return fields


def fid_fields(moments: list[FeatureMoments], ref: ReferenceStats) -> FidFields:
    """The FID of each repeat, from its merged feature moments, their mean and sample std."""
    fids = [frechet_distance(*m.mean_cov(), ref.mu, ref.sigma) for m in moments]
    return FidFields(fid=_mean(fids), fids=fids, fid_std=_std(fids))


def kid_fields(per_repeat: list[RepeatScores], subset_size: int) -> KidFields:
    """The KID of each repeat (its mean over KID_SUBSETS subsets), their mean and sample std."""
    kids = [s.kid_mean for s in per_repeat if s.kid_mean is not None]
    return KidFields(
        kids=kids,
        kid_mean=_mean(kids),
        kid_mean_std=_std(kids),
        kid_std=_mean([s.kid_std for s in per_repeat if s.kid_std is not None]),
        kid_subset_size=subset_size,
        kid_subsets=KID_SUBSETS,
    )


def isc_fields(per_repeat: list[RepeatScores]) -> IscFields:
    """The Inception Score and its std over splits, each the mean over the repeats."""
    return IscFields(
        isc_mean=_mean([s.isc_mean for s in per_repeat if s.isc_mean is not None]),
        isc_std=_mean([s.isc_std for s in per_repeat if s.isc_std is not None]),
    )


# -- the driver ------------------------------------------------------------------------------------
def evaluate_samples(
    store: Store,
    dataset: DatasetManifest,
    samples: SampleSet,
    cfg: EvalConfig,
    *,
    pool: WorkerPool | None = None,
    cache_dir: Path | None = None,
    extractor: ExtractorInfo | None = None,
) -> Metrics:
    """Score `samples` against the held-out split of `dataset`; writes the set's `metrics.json`.

    The shards are extracted on `pool` (`tasks.evaluate.stage` passes a pool of Ray actors; by
    default this process). `extractor` skips resolution (a flow resolves once and scores many
    sample sets); by default `resolve_extractor(cfg, store)`. The report renders the metrics
    (`tasks.report.stage.write_evaluation_report`).
    """
    _check_samples(store, dataset, samples, cfg.repeats)
    extractor = extractor or resolve_extractor(cfg, store, cache_dir=cache_dir)
    pool = pool or LocalPool(FeatureWorker(store.config, cfg, extractor, dataset.channels))
    jobs = _sample_jobs(samples, cfg.repeats, extractor.sha256)
    extracted = _extract(pool, jobs, cfg.repeats, cfg.repeats * samples.num_images)
    want = set(cfg.metrics)
    needs_ref = {"fid", "kid", "prc", "memorization", "fd_dinov2"}
    ref = reference_features(store, dataset, extractor, cfg, pool) if want & needs_ref else None
    skipped = [reason] if (reason := skip_reason(cfg)) else []
    train = (
        training_features(store, dataset, extractor, cfg, pool) if "memorization" in want else None
    )
    if "memorization" in want and train is None:
        skipped.append("memorization check skipped: the dataset has no training split")
    tau = (
        memorization_threshold(ref.features, train.features, cfg.memorization_quantile)
        if train is not None and ref is not None
        else None
    )
    for line in skipped:
        log.warning("%s", line)
    subset_size = _kid_subset_size(cfg, samples.num_images, ref)
    per_repeat = (
        _repeat_scores(pool, jobs, cfg, ref, subset_size, train, tau)
        if want & {"kid", "isc", "prc"} or train is not None
        else []
    )
    fid = fid_fields(extracted.moments, ref) if "fid" in want and ref else FidFields()
    kid = kid_fields(per_repeat, subset_size) if "kid" in want else KidFields()
    isc = isc_fields(per_repeat) if "isc" in want else IscFields()
    near = neighbour_fields(per_repeat, cfg, train, tau)
    dino = (
        fd_dinov2_fields(store, cfg, dataset, samples, ref.count)
        if "fd_dinov2" in want and not skip_reason(cfg) and ref is not None
        else DinoFields()
    )
    problems = _problems(extracted.checks, cfg.repeats * samples.num_images)
    for problem in problems:
        log.warning("sample set %s: %s", store.url(samples.key), problem)
    metrics = Metrics(
        **fid,
        **kid,
        **isc,
        **near,
        **dino,
        skipped=skipped,
        num_reference_images=ref.count if ref else None,
        reference_stats_key=ref.key if ref else None,
        run_id=samples.run_id,
        sample_set=samples.name,
        samples_key=samples.key,
        checkpoint_key=samples.checkpoint.key,
        checkpoint_step=samples.checkpoint.step,
        sampling=samples.config,
        num_images=samples.num_images,
        repeats=cfg.repeats,
        seed_ranges=samples.seed_ranges()[: cfg.repeats],
        weights=samples.weights,
        dataset_fingerprint=dataset.fingerprint,
        extractor=extractor.to_record(),
        provenance=provenance(extracted.devices),
        problems=problems + _non_finite({**fid, **kid, **isc, **near, **dino}),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    metrics.write(store, metrics.key)
    shown = [f"{n.upper()} {s.describe()}" for n in METRICS if (s := MetricSample.of(metrics, n))]
    log.info("evaluation written to %s: %s", store.url(metrics.prefix), "; ".join(shown))
    return metrics


def _check_samples(store: Store, dataset: DatasetManifest, samples: SampleSet, k: int) -> None:
    got = (samples.channels, samples.image_size)
    want = (dataset.channels, dataset.image_size)
    if got != want:
        raise ValueError(
            f"samples {store.url(samples.key)} are (channels, size) = {got} but dataset "
            f"{dataset.dataset!r} holds {want}; evaluate samples of a model trained on this dataset"
        )
    if samples.repeats < k:
        raise ValueError(
            f"evaluate.repeats={k} needs {k} seed ranges, but sample set {store.url(samples.key)} "
            f"holds {samples.repeats}; sample with the same evaluate.repeats first"
        )


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


@dataclass
class _Extracted:
    """The driver's whole state of an extraction: one moment sum per repeat (2 x 2048^2 float64
    numbers), not the shards' results, so it does not grow with the number of shards."""

    moments: list[FeatureMoments]
    checks: list[ImageChecks]
    devices: set[str]


def _extract(
    pool: WorkerPool, jobs: list[tuple[int, ShardJob]], repeats: int, total: int
) -> _Extracted:
    repeat_of = {job.index: j for j, job in jobs}
    sums: list[FeatureMoments | None] = [None] * repeats
    checks: list[ImageChecks] = []
    devices: set[str] = set()
    progress = Progress("extracting features", total)
    results: Iterator[ShardFeatures] = pool.map_shards([job for _, job in jobs])
    for result in results:
        j = repeat_of[result.index]
        previous = sums[j]
        sums[j] = result.moments if previous is None else previous + result.moments
        checks.append(result.checks)
        devices.add(result.device)
        if result.reused:
            progress.skip(result.count)
        else:
            progress.update(result.count)
    moments = [m for m in sums if m is not None]
    assert len(moments) == repeats, "a repeat without shards"
    return _Extracted(moments, checks, devices)


def _kid_subset_size(cfg: EvalConfig, num_images: int, ref: ReferenceStats | None) -> int:
    size = min(cfg.kid_subset_size, num_images, ref.count if ref else 0)
    if "kid" in cfg.metrics and size < cfg.kid_subset_size:
        log.warning(
            "KID subset size lowered from %d to %d (number of images)", cfg.kid_subset_size, size
        )
    return size


def _repeat_scores(
    pool: WorkerPool,
    jobs: list[tuple[int, ShardJob]],
    cfg: EvalConfig,
    ref: ReferenceStats | None,
    subset_size: int,
    train: TrainingFeatures | None = None,
    tau: float | None = None,
) -> list[RepeatScores]:
    """KID, IS, precision/recall and the memorized share of each repeat, scored by the pool from
    the features it kept in the store."""
    score_jobs = [
        ScoreJob(
            repeat=j,
            features_keys=tuple(job.features_key or "" for r, job in jobs if r == j),
            reference_key=ref.key if ref is not None else None,
            kid_subset_size=subset_size,
            kid="kid" in cfg.metrics,
            isc="isc" in cfg.metrics,
            prc="prc" in cfg.metrics and ref is not None,
            training_key=train.key if train is not None and tau is not None else None,
            memorization_threshold=tau,
        )
        for j in range(cfg.repeats)
    ]
    return sorted(pool.scores(score_jobs), key=lambda s: s.repeat)


def _problems(checks: list[ImageChecks], total: int) -> list[str]:
    """A degenerate sample set whatever its FID: every image flat (one value, e.g. the black
    images of a diverged model), or every image the same."""
    if sum(c.flat for c in checks) == total:
        return [f"all {total} samples are flat images (a single pixel value each)"]
    firsts = {c.first_image for c in checks}
    if total > 1 and len(firsts) == 1 and all(c.all_same for c in checks):
        return [f"all {total} samples are the same image"]
    return []


def _non_finite(fields: Mapping[str, object]) -> list[str]:
    """A score that is NaN or infinite (one of a list included) makes the evaluation untrustworthy."""

    def bad(value: object) -> bool:
        return isinstance(value, float) and not math.isfinite(value)

    return [
        f"{name} is {value}"
        for name, value in fields.items()
        if bad(value) or (isinstance(value, list) and any(map(bad, value)))
    ]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1): the spread of a metric over repeats; None for one."""
    return statistics.stdev(values) if len(values) > 1 else None
