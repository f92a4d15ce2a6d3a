"""Inception features, one shard at a time: the unit of work of a distributed evaluation.

A `FeatureWorker` loads the extractor once, then streams shard after shard (batch by batch, never a
whole sample set), keeps each sample shard's features in the store (float32: the network's own
precision, so nothing is lost) and returns their exact moments (`FeatureMoments`: count, sum, sum
of outer products, float64). The driver adds the moments up: the FID of the merged moments is the
FID of all the features, with no features gathered anywhere. KID and IS need the features
themselves: a worker scores one repeat from the stored features (`scores`), so a re-evaluation,
or another metric later, extracts nothing again.

The same worker runs in this process (`LocalPool`) or as a Ray actor (`tasks.evaluate.stage`).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_features_to_metric,
)

from diffusion_core.fid import FeatureMoments, kernel_inception_distance
from tasks.config import EvalConfig, StorageConfig
from tasks.evaluate.inception import FEATURES, ExtractorInfo, load_extractor, resolve_extractor
from tasks.evaluate.neighbours import memorized_share, precision_recall
from tasks.npz import DamagedCacheError, read_npz, write_npz
from tasks.storage import Store, open_store, sha256_file
from tasks.usage import reported
from tasks.webdata import DecodedSample, decode_sample, iter_raw_samples

log = logging.getLogger(__name__)

KID_SUBSETS = 100
ISC_SPLITS = 10
_POOL, _LOGITS = FEATURES  # "2048": pool features, "logits_unbiased": for the Inception Score


@dataclass(frozen=True)
class ShardJob:
    """Extract the features of the first `count` images of shard `key` (sha256 `sha256`).

    `features_key`: where the features are kept (read back when they are already there, for the
    same shard bytes and extractor); None returns them instead (the held-out reference)."""

    index: int
    key: str
    count: int
    sha256: str
    features_key: str | None


@dataclass(frozen=True)
class ImageChecks:
    """What tells a degenerate set whatever its FID: flat images, every image the same."""

    flat: int  # images with a single pixel value
    first_image: str  # sha256 of the shard's first image
    all_same: bool  # every image equals the first


@dataclass(frozen=True, eq=False)
class ShardFeatures:
    """What a worker returns for one shard: moments of its pool features, and what the driver
    needs to tell a degenerate sample set (flat images, all images the same)."""

    index: int
    count: int
    moments: FeatureMoments  # of the 2048-d pool features
    checks: ImageChecks
    reused: bool  # read from the store, not extracted
    device: str
    features: np.ndarray | None = None  # float32 [count, 2048] when the job asked for them


@dataclass(frozen=True)
class ScoreJob:
    """KID and/or IS of one repeat from its stored features, against the reference features."""

    repeat: int
    features_keys: tuple[str, ...]
    reference_key: str | None  # the cached reference .npz (KID)
    kid_subset_size: int
    kid: bool
    isc: bool
    prc: bool = False  # precision and recall against the reference features
    training_key: str | None = None  # the cached training features (memorization)
    memorization_threshold: float | None = None  # tau (`tasks.evaluate.neighbours`)


@dataclass(frozen=True)
class RepeatScores:
    repeat: int
    kid_mean: float | None = None
    kid_std: float | None = None
    isc_mean: float | None = None
    isc_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    memorized_share: float | None = None


class WorkerPool(Protocol):
    """Where the work runs: this process, or a pool of Ray actors."""

    def map_shards(self, jobs: list[ShardJob]) -> Iterator[ShardFeatures]:
        """Results in any order (each carries its job's index)."""
        ...

    def scores(self, jobs: list[ScoreJob]) -> list[RepeatScores]: ...


def device_name(device: str) -> str:
    """The device kind for provenance: "cpu" or "cuda (NVIDIA H100 80GB HBM3)"."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def read_stored_features(store: Store, key: str) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """A shard's stored features {"2048": float32 [N, 2048], "logits_unbiased": [N, 1008]} and
    their meta (shard and extractor sha256, count, image checks); `DamagedCacheError` when the
    object's bytes do not read back."""
    cached = read_npz(store, key, FEATURES)
    return cached.arrays, cached.meta


class FeatureWorker:
    """Loads the extractor once; extracts and scores shard features from the store."""

    def __init__(
        self,
        storage: StorageConfig,
        cfg: EvalConfig,
        extractor: ExtractorInfo,
        channels: int,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.store = open_store(storage)
        self.cfg, self.channels = cfg, channels
        self.device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
        self.extractor = _locate(extractor, cfg, self.store)
        self.model = load_extractor(self.extractor, self.device)

    @reported
    def shard(self, job: ShardJob) -> ShardFeatures:
        if job.features_key is not None:
            stored = self._stored(job)
            if stored is not None:
                return stored
        features, checks = self._extract(job)
        if job.features_key is not None:
            self._keep(job, features, checks)
        return ShardFeatures(
            index=job.index,
            count=len(features[_POOL]),
            moments=FeatureMoments.from_features(features[_POOL]),
            reused=False,
            device=device_name(self.device),
            features=None if job.features_key is not None else features[_POOL],
            checks=checks,
        )

    def _extract(self, job: ShardJob) -> tuple[dict[str, np.ndarray], ImageChecks]:
        """Stream the shard batch by batch through the extractor."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in FEATURES}
        flat, first, all_same = 0, None, True
        raw = iter_raw_samples(self.store, [job.key], {job.key: job.sha256})
        images = (decode_sample(s, self.channels) for s in itertools.islice(raw, job.count))
        for batch in _batches(images, job.count, self.cfg.batch_size):
            pixels = batch.reshape(len(batch), -1)
            flat += int((pixels.max(axis=1) == pixels.min(axis=1)).sum())
            if first is None:
                first = batch[0].copy()
            all_same = all_same and bool((batch == first).all())
            x = torch.from_numpy(batch).to(self.device)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            with torch.inference_mode():
                for name, value in zip(FEATURES, self.model(x), strict=True):
                    out[name].append(value.float().cpu().numpy())
        for _ in raw:  # the rest of the shard, read but not decoded: its sha256 is checked
            pass
        if first is None:
            raise ValueError(f"shard {self.store.url(job.key)} holds no images")
        features = {name: np.concatenate(parts) for name, parts in out.items()}
        if len(features[_POOL]) < job.count:
            raise ValueError(
                f"shard {self.store.url(job.key)} holds {len(features[_POOL])} images, its "
                f"manifest promises {job.count}; rerun the stage that wrote it"
            )
        checks = ImageChecks(flat, hashlib.sha256(first.tobytes()).hexdigest(), all_same)
        return features, checks

    def _meta(self, job: ShardJob) -> dict[str, object]:
        return {
            "shard_sha256": job.sha256,
            "extractor_sha256": self.extractor.sha256,
            "count": job.count,
        }

    def _keep(self, job: ShardJob, features: dict[str, np.ndarray], checks: ImageChecks) -> None:
        assert job.features_key is not None
        meta = self._meta(job) | asdict(checks) | {"extractor_label": self.extractor.label}
        write_npz(self.store, job.features_key, features, meta)

    def _stored(self, job: ShardJob) -> ShardFeatures | None:
        assert job.features_key is not None
        try:
            features, meta = read_stored_features(self.store, job.features_key)
        except FileNotFoundError:
            return None
        except DamagedCacheError as err:  # extracted again and overwritten by `shard`
            log.warning("%s; extracting the features of %s again", err, job.key)
            return None
        if any(meta.get(k) != v for k, v in self._meta(job).items()):
            return None  # another shard or extractor under this key: extract again
        return ShardFeatures(
            index=job.index,
            count=len(features[_POOL]),
            moments=FeatureMoments.from_features(features[_POOL]),
            checks=ImageChecks(
                int(str(meta["flat"])), str(meta["first_image"]), meta["all_same"] is True
            ),
            reused=True,
            device=device_name(self.device),
        )

    @reported
    def scores(self, job: ScoreJob) -> RepeatScores:
        parts = [read_stored_features(self.store, key)[0] for key in job.features_keys]
        result = RepeatScores(repeat=job.repeat)
        if job.kid:
            assert job.reference_key is not None
            reference = read_npz(self.store, job.reference_key, ["features"]).arrays["features"]
            mean, std = kernel_inception_distance(
                np.concatenate([p[_POOL] for p in parts]),
                reference,
                job.kid_subset_size,
                KID_SUBSETS,
                seed=2020,
            )
            result = RepeatScores(repeat=job.repeat, kid_mean=mean, kid_std=std)
        if job.isc:
            logits = np.concatenate([p[_LOGITS] for p in parts]).astype(np.float64)
            isc = isc_features_to_metric(
                torch.from_numpy(logits),
                splits=min(ISC_SPLITS, len(logits)),
                shuffle=True,
                rng_seed=2020,
            )
            result = RepeatScores(
                repeat=job.repeat,
                kid_mean=result.kid_mean,
                kid_std=result.kid_std,
                isc_mean=float(isc[KEY_METRIC_ISC_MEAN]),
                isc_std=float(isc[KEY_METRIC_ISC_STD]),
            )
        return self._neighbour_scores(job, parts, result)

    def _neighbour_scores(
        self, job: ScoreJob, parts: list[dict[str, np.ndarray]], result: RepeatScores
    ) -> RepeatScores:
        """Precision/recall and the memorized share of one repeat (`tasks.evaluate.neighbours`)."""
        if not job.prc and job.training_key is None:
            return result
        samples = np.concatenate([p[_POOL] for p in parts])
        if job.prc:
            assert job.reference_key is not None
            reference = read_npz(self.store, job.reference_key, ["features"]).arrays["features"]
            pr = precision_recall(samples, reference)
            if pr is not None:
                result = replace(result, precision=pr[0], recall=pr[1])
        if job.training_key is not None:
            assert job.memorization_threshold is not None
            train = read_npz(self.store, job.training_key, ["features"]).arrays["features"]
            share = memorized_share(samples, train, job.memorization_threshold)
            result = replace(result, memorized_share=share)
        return result


def _locate(info: ExtractorInfo, cfg: EvalConfig, store: Store) -> ExtractorInfo:
    """The driver's extractor on this node: its file when this node has it (same machine),
    else resolved again here (store, cache, configured URL), and then it must be the same bytes."""
    if info.path.is_file() and sha256_file(info.path) == info.sha256:
        return info
    here = resolve_extractor(cfg, store)
    if here.sha256 != info.sha256:
        raise RuntimeError(
            f"this worker resolves the Inception weights to sha256 {here.sha256[:16]} "
            f"({here.source}), the driver to {info.sha256[:16]} ({info.source}); give every node "
            "the same evaluate.inception_weights"
        )
    return here


def _batches(images: Iterable[DecodedSample], limit: int, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [B, C, H, W] batches of the first `limit` decoded samples."""
    batch: list[np.ndarray] = []
    for n, sample in enumerate(images):
        if n >= limit:
            break
        batch.append(sample.image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


class LocalPool:
    """The work in this process, one shard after another."""

    def __init__(self, worker: FeatureWorker) -> None:
        self.worker = worker

    def map_shards(self, jobs: list[ShardJob]) -> Iterator[ShardFeatures]:
        return (self.worker.shard(job) for job in jobs)

    def scores(self, jobs: list[ScoreJob]) -> list[RepeatScores]:
        return [self.worker.scores(job) for job in jobs]
