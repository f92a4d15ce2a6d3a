"""What the stages hand each other, as typed records: the same records are what the store holds.

    shard    -> DatasetManifest (+ ShardResult: was it reused)
    train    -> Checkpoint (runs/<id>/checkpoints/latest.json) (+ TrainResult)
    sample   -> SampleSet, made of SampleShard receipts
    evaluate -> Metrics (+ Evaluation: the metrics and the report's Markdown)
    promote  -> PromotionDecision, Champion, PromotionHistory
    nightly  -> NightlySummary
    samplers -> SamplerChoice (a sweep of sampler settings, scored and chosen)
    sweep    -> SweepTrial (one trial's segments), SweepResult (the sweep, its winner confirmed)

A stored record carries its `format` (name@version). Reading a record of another format fails with
a `RecordFormatError` naming the object, the format found and the one this version reads; a record
that does not fit its type fails with the fields that do not.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from diffusion_core.unet import UNetConfig
from tasks import layout
from tasks.config import DataConfig, ModelConfig, SampleConfig
from tasks.storage import Store
from tasks.usage import Cost, Usage


class RecordFormatError(ValueError):
    """A stored record of another format version, or one that does not fit its type."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Record(_Model):
    """A record stored as JSON; subclasses declare `format: Literal[NAME] = NAME`."""

    format: str

    @classmethod
    def expected_format(cls) -> str:
        return str(cls.model_fields["format"].default)

    @classmethod
    def parse(cls, data: object, source: str) -> Self:
        """Validate `data` (decoded JSON) read from `source` (a URL, for messages)."""
        found = data.get("format") if isinstance(data, dict) else None
        if found != cls.expected_format():
            raise RecordFormatError(
                f"{source} holds a {found or 'format-less'} record, but this version of "
                f"diffusion-pipeline reads {cls.expected_format()}. It was written by another "
                "version: rerun the stage that writes it (or use the version that wrote it)."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            fields = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5]
            )
            raise RecordFormatError(
                f"{source} is not a valid {cls.expected_format()} record ({fields})"
            ) from None

    @classmethod
    def read(cls, store: Store, key: str) -> Self:
        try:
            data = store.read_json(key)
        except json.JSONDecodeError as err:
            raise RecordFormatError(f"{store.url(key)} is not JSON ({err})") from None
        return cls.parse(data, store.url(key))

    @classmethod
    def read_or_none(cls, store: Store, key: str) -> Self | None:
        try:
            return cls.read(store, key)
        except FileNotFoundError:
            return None

    def write(self, store: Store, key: str) -> None:
        store.write_json(key, self.model_dump(mode="json"))


# -- shard ---------------------------------------------------------------------------------------
class ShardInfo(_Model):
    """One WebDataset .tar object: its key, sample count, sha256 and size in bytes; a dataset
    shard also names the listing chunk it was written from (`tasks.shard.chunks.chunk_id`)."""

    key: str
    count: int
    sha256: str
    bytes: int
    chunk: str | None = None


class SplitInfo(_Model):
    count: int
    shards: list[ShardInfo]


class SkippedFile(_Model):
    """A source file the shard stage left out (`data.on_bad_file=skip`, `on_empty_class=skip`)."""

    path: str  # relative to the source (a class folder ends with '/')
    reason: str
    chunk: str | None = None  # the listing chunk it belonged to (None: a skipped class folder)


class DatasetManifest(Record):
    """A complete shard set (written last, after every shard).

    `shard_set` names the folder: a hash of the source and of the settings that shape the shards,
    the same for every version of a growing source, so a rerun keeps the shards of unchanged
    chunks in place. `fingerprint` covers every shard's chunk and sha256 (and the settings):
    it changes iff the shards' content does. `source_fingerprint` covers the listing (keys,
    labels, sizes, etags or mtimes)."""

    format: Literal["diffusion-pipeline/dataset@2"] = "diffusion-pipeline/dataset@2"
    dataset: str
    source: str  # where the images were read from (a URL, or the built-in dataset's name)
    shard_set: str
    fingerprint: str
    source_fingerprint: str
    image_size: int
    channels: int
    num_classes: int
    class_names: list[str]
    splits: dict[layout.Split, SplitInfo]
    skipped: list[SkippedFile] = []
    config: DataConfig
    created: str

    @property
    def prefix(self) -> str:
        return layout.dataset_prefix(self.dataset, self.shard_set)

    @property
    def key(self) -> str:
        return layout.dataset_manifest(self.prefix)

    def split(self, name: layout.Split) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"dataset manifest {self.key} has no {name!r} split")
        return self.splits[name]


class ShardResult(_Model):
    """The shard stage's hand-off: the manifest, whether an identical earlier set was reused, and
    how many shards this run wrote and kept from earlier runs (unchanged chunks)."""

    manifest: DatasetManifest
    reused: bool
    written: int = 0
    kept: int = 0


# -- train ---------------------------------------------------------------------------------------
class Checkpoint(Record):
    """A complete training checkpoint, as `latest.json` points at it: where it is, its sha256, and
    what its network is, so later stages need not download it to learn its step or shape."""

    format: Literal["diffusion-pipeline/checkpoint@1"] = "diffusion-pipeline/checkpoint@1"
    run_id: str
    step: int
    key: str
    sha256: str
    unet: UNetConfig
    model: ModelConfig
    dataset_fingerprint: str
    # Set on an EMA rebuilt after training from the run's power-EMA snapshots (`diffpipe ema`):
    # its width. Its samples are another set than the training checkpoint's of the same step.
    # Left out of the JSON when None, so training checkpoints' records read as they always did.
    phema_sigma_rel: float | None = Field(default=None, exclude_if=lambda v: v is None)

    @classmethod
    def latest(cls, store: Store, run_id: str) -> Checkpoint | None:
        """The newest complete checkpoint of `run_id`, or None before its first one."""
        return cls.read_or_none(store, layout.latest_checkpoint(run_id))

    @classmethod
    def require_latest(cls, store: Store, run_id: str) -> Checkpoint:
        latest = cls.latest(store, run_id)
        if latest is None:
            raise FileNotFoundError(
                f"run {run_id!r} has no checkpoint yet; run `diffpipe train` first"
            )
        return latest

    def read_bytes(self, store: Store) -> bytes:
        """The checkpoint's bytes, checked against the sha256 recorded when it was written."""
        data = store.read_bytes(self.key)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise RecordFormatError(
                f"checkpoint {store.url(self.key)} does not match its recorded sha256 "
                f"{self.sha256[:16]}…: it was changed or damaged after it was written; restore it "
                f"or point {layout.latest_checkpoint(self.run_id)} at an intact checkpoint"
            )
        return data


MetricName = Literal["fid", "kid"]


class CheckpointScore(_Model):
    """One checkpoint scored while training ran (`evaluate.score_every`): a small sample set on
    seed ranges of its own (`evaluate.score_seed_start` on), so a checkpoint chosen by these
    scores is confirmed on other seeds."""

    step: int
    metric: MetricName
    mean: float
    std: float | None  # over the seed ranges; None with one range
    values: list[float]  # one per seed range
    num_images: int  # per seed range
    metrics_key: str  # the evaluation's metrics.json

    def describe(self) -> str:
        return with_noise(self.mean, self.std, len(self.values), f", n={self.num_images}")


class TrainResult(_Model):
    checkpoint: Checkpoint
    resumed_from: int | None
    trained_steps: int
    loss: float | None  # mean over the last logging window, all ranks; None when nothing ran
    # With `evaluate.score_every`: this stage's scored checkpoints, and the best of them (the
    # nightly's challenger, which it confirms at full n); else empty and None.
    scores: list[CheckpointScore] = []
    best: Checkpoint | None = None


class LogWindow(_Model):
    """One training logging window (`train.log_every` steps), averaged over all ranks."""

    step: int  # the window's last step
    loss: float
    lr: float
    images_per_s: float
    data_wait: float  # fraction of the window's step time spent waiting for data
    grad_norm: float | None = None
    seconds: float  # wall time of the window


class TrainHistory(Record):
    """`runs/<id>/logs/history.json`: every logging window of the run, across nights and resumes
    (windows after a resumed checkpoint's step replace those of the lost attempt)."""

    format: Literal["diffusion-pipeline/train-history@1"] = "diffusion-pipeline/train-history@1"
    run_id: str
    windows: list[LogWindow]
    # Checkpoints scored while training ran (`evaluate.score_every`), by step; absent in older
    # histories.
    scores: list[CheckpointScore] = []


# -- sample --------------------------------------------------------------------------------------
class SampleWeights(Record):
    """`<set>/weights.json`, beside `weights.pt`: which weights the set samples (the EMA's or the
    raw model's) and the file's sha256, so a rerun reads this and not the weights to learn it."""

    format: Literal["diffusion-pipeline/sample-weights@1"] = "diffusion-pipeline/sample-weights@1"
    weights: Literal["ema", "raw"]
    sha256: str


class SampleShard(Record):
    """Receipt of one seed range's shard, written after the shard: its presence means complete."""

    format: Literal["diffusion-pipeline/sample-shard@1"] = "diffusion-pipeline/sample-shard@1"
    key: str
    count: int
    sha256: str
    bytes: int
    seed_start: int
    seed_stop: int


def _unclipped_if_older(value: object) -> object:
    """Sample settings recorded before `clip_x0` existed: those images were made without it, so
    they never look comparable with (or the same set as) clipped ones."""
    if isinstance(value, dict) and "clip_x0" not in value:
        return {**value, "clip_x0": False}
    return value


class SampleSet(Record):
    """A complete sample set (manifest written last): `repeats` disjoint seed ranges of
    `num_images` images each, from `config.seed_start` on; no shard spans two repeats."""

    format: Literal["diffusion-pipeline/samples@3"] = "diffusion-pipeline/samples@3"
    name: str
    run_id: str
    checkpoint: Checkpoint
    weights_key: str
    weights: Literal["ema", "raw"]  # what weights.pt holds (raw when the checkpoint had no EMA)
    num_images: int  # per repeat
    repeats: int = 1
    image_size: int
    channels: int
    shards: list[SampleShard]
    config: SampleConfig
    created: str

    _older_config = field_validator("config", mode="before")(_unclipped_if_older)

    @property
    def prefix(self) -> str:
        return layout.sample_set_prefix(self.run_id, self.name)

    @property
    def key(self) -> str:
        return layout.sample_manifest(self.prefix)

    def seed_ranges(self) -> list[tuple[int, int]]:
        """[start, stop) of each repeat."""
        first, n = self.config.seed_start, self.num_images
        return [(first + j * n, first + (j + 1) * n) for j in range(self.repeats)]

    def repeat_shards(self, repeat: int) -> list[SampleShard]:
        """The shards holding the seeds of repeat `repeat` (0-based), in seed order."""
        start, stop = self.seed_ranges()[repeat]
        return [s for s in self.shards if start <= s.seed_start and s.seed_stop <= stop]


# -- evaluate ------------------------------------------------------------------------------------
class ExtractorRecord(_Model):
    label: str
    weights_sha256: str
    standard: bool  # the published pt_inception-2015-12-05 weights: FIDs comparable with papers
    source: str


# The metrics measured on each repeat (one of them decides promotion), in the order reports list
# them; IS is measured within a repeat only.
METRICS: tuple[MetricName, ...] = get_args(MetricName)


class Provenance(_Model):
    """What produced an evaluation: code, libraries and device (shown in the report)."""

    package_version: str
    git_commit: str | None = None  # None outside a git checkout (an installed wheel, an image)
    torch: str
    torch_fidelity: str
    device: str  # e.g. "cpu" or "cuda (NVIDIA H100 80GB HBM3)"


class Metrics(Record):
    """One evaluation of a sample set against the held-out split (`runs/<id>/eval/<set>/`).

    With `evaluate.repeats = k` the set holds k disjoint seed ranges of `num_images` each; every
    range is scored on its own (`fids`, `kids`) and `fid` / `kid_mean` are their means, `fid_std` /
    `kid_mean_std` their sample standard deviations (None with one repeat: no noise measured).
    """

    format: Literal["diffusion-pipeline/metrics@2"] = "diffusion-pipeline/metrics@2"
    run_id: str
    sample_set: str
    samples_key: str
    checkpoint_key: str
    checkpoint_step: int
    sampling: SampleConfig
    num_images: int  # per repeat
    repeats: int = 1
    seed_ranges: list[tuple[int, int]] = []  # one [start, stop) per repeat
    weights: Literal["ema", "raw"] = "ema"
    num_reference_images: int | None = None
    reference_stats_key: str | None = None
    dataset_fingerprint: str
    fid: float | None = None  # mean over the repeats
    fids: list[float] = []  # one per repeat
    fid_std: float | None = None
    kids: list[float] = []  # KID mean of each repeat
    kid_mean_std: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    kid_subset_size: int | None = None
    kid_subsets: int | None = None
    isc_mean: float | None = None
    isc_std: float | None = None
    # Beside FID (README: Metrics beside FID); absent in records written before them.
    precisions: list[float] = []  # one per repeat, on the FID features (torch-fidelity's prc)
    recalls: list[float] = []
    precision: float | None = None  # mean over the repeats
    recall: float | None = None
    memorized_shares: list[float] = []  # per repeat: samples nearer the training set than tau
    memorized_share: float | None = None  # mean over the repeats
    memorization_threshold: float | None = None  # tau, in feature units
    memorization_quantile: float | None = None  # q: tau's quantile of held-out distances
    num_training_images: int | None = None
    fd_dinov2s: list[float] = []  # Frechet distance on DINOv2 ViT-S/14 features, per repeat
    fd_dinov2: float | None = None
    fd_dinov2_std: float | None = None
    dinov2_weights_sha256: str | None = None
    skipped: list[str] = []  # metrics asked for but not computed, each with why
    extractor: ExtractorRecord
    provenance: Provenance | None = None
    problems: list[str] = []  # why these numbers must not be trusted (degenerate samples, ...)
    created: str

    _older_sampling = field_validator("sampling", mode="before")(_unclipped_if_older)

    @property
    def comparable_with_published(self) -> bool:
        return self.extractor.standard

    @property
    def prefix(self) -> str:
        return layout.eval_prefix(self.run_id, self.sample_set)

    @property
    def key(self) -> str:
        return layout.eval_metrics(self.prefix)

    @property
    def grid_key(self) -> str:
        return layout.eval_grid(self.prefix)

    @property
    def report_key(self) -> str:
        return layout.eval_report(self.prefix)

    def value(self, metric: MetricName) -> float | None:
        return self.fid if metric == "fid" else self.kid_mean

    def values(self, metric: MetricName) -> list[float]:
        """The metric of each repeat (one value when the evaluation was not repeated)."""
        per_repeat = self.fids if metric == "fid" else self.kids
        single = self.value(metric)
        return list(per_repeat) if per_repeat else ([] if single is None else [single])

    def std(self, metric: MetricName) -> float | None:
        """Sample standard deviation of the metric over the repeats; None with one repeat."""
        return self.fid_std if metric == "fid" else self.kid_mean_std

    def scores(self) -> dict[str, float]:
        """Every score this evaluation measured, by field name (what a metrics table lists)."""
        named = {
            "fid": self.fid,
            "fid_std": self.fid_std,
            "kid_mean": self.kid_mean,
            "kid_mean_std": self.kid_mean_std,
            "kid_std": self.kid_std,
            "isc_mean": self.isc_mean,
            "isc_std": self.isc_std,
            "precision": self.precision,
            "recall": self.recall,
            "memorized_share": self.memorized_share,
            "fd_dinov2": self.fd_dinov2,
            "fd_dinov2_std": self.fd_dinov2_std,
        }
        return {name: value for name, value in named.items() if value is not None}


class Evaluation(_Model):
    """An evaluation as a flow hands it on: the metrics and the report.md written for them
    (`tasks.report.stage.write_evaluation_report`; not read back)."""

    metrics: Metrics
    report_markdown: str


# -- promote -------------------------------------------------------------------------------------
class MetricSample(_Model):
    """One evaluation's promotion metric: the mean over its k repeats and their sample standard
    deviation (None when k = 1: no noise was measured)."""

    mean: float
    std: float | None
    k: int
    values: list[float]

    @classmethod
    def of(cls, metrics: Metrics, metric: MetricName) -> MetricSample | None:
        mean = metrics.value(metric)
        if mean is None:
            return None
        values = metrics.values(metric)
        return cls(mean=mean, std=metrics.std(metric), k=max(len(values), 1), values=values)

    def describe(self, detail: str = "") -> str:
        """The metric with its noise, as every report, log line and reason writes it."""
        return with_noise(self.mean, self.std, self.k, detail)


def with_noise(mean: float, std: float | None, k: int, detail: str = "") -> str:
    """'0.09030 ± 0.0021 (std over k=3)', or '0.09030 (noise not measured: k=1)' when one repeat
    measured no noise; `detail` goes inside the parentheses, after the noise."""
    if std is None or k < 2:
        return f"{mean:#.4g} (noise not measured: k={k}{detail})"
    return f"{mean:#.4g} ± {std:#.2g} (std over k={k}{detail})"


class PromotionEvidence(_Model):
    """What a promotion decision weighed (README: Promotion). Lower metric values are better, so
    `improvement` = champion mean - challenger mean; the challenger wins iff improvement > threshold."""

    challenger: MetricSample | None
    champion: MetricSample | None = None
    champion_checkpoint_key: str | None = None
    # "paired": t over the k per-range differences (same seed ranges); "welch": unpaired, the rule
    # before the paired test (older records hold None and were decided by Welch).
    test: Literal["paired", "welch"] | None = None
    improvement: float | None = None
    standard_error: float | None = None  # of the improvement: sd(d)/sqrt(k), or Welch's
    df: float | None = None  # k - 1 (paired), Welch-Satterthwaite (welch)
    alpha: float  # promote.alpha: the one-sided test's false-promotion rate
    margin: float | None = None  # Student-t quantile t(1 - alpha, df): the bar, in standard errors
    min_improvement: float | None = None  # promote.min_improvement (relative)
    threshold: float | None = None  # the improvement required, in metric units
    detectable: float | None = None  # threshold / champion mean: smaller improvements are noise
    memorized_share: float | None = None  # the challenger's, when measured
    max_memorized_share: float | None = None  # promote.max_memorized_share


class PromotionDecision(_Model):
    """The decision of one night (`night`, the nightly's stamp): a rerun of the night replaces it."""

    promoted: bool
    reason: str
    night: str
    model_name: str
    metric: MetricName
    value: float | None
    checkpoint_key: str
    checkpoint_step: int
    promoted_key: str | None = None
    decided_at: str
    evidence: PromotionEvidence


class Champion(Record):
    """`models/<name>/current.json`: the promoted model and the evaluation that won it the place.
    Each champion is also kept at `models/<name>/step-<step>.json` (`key`); `previous_key` names
    the one it replaced, which `diffpipe promote --rollback` restores."""

    format: Literal["diffusion-pipeline/champion@2"] = "diffusion-pipeline/champion@2"
    model_name: str
    step: int
    checkpoint_key: str  # the store's own copy, which outlives training's pruning
    source_checkpoint_key: str
    metrics: Metrics
    promoted_at: str
    night: str | None = None  # the night whose decision promoted it (None: restored by hand)
    previous_key: str | None = None

    @property
    def key(self) -> str:
        return layout.model_champion(self.model_name, self.step)


class Rollback(_Model):
    """`diffpipe promote --rollback`: the champion `from_key` gave its place back to `to_key`."""

    at: str
    from_key: str
    from_step: int
    to_key: str
    to_step: int


class PromotionHistory(Record):
    """`models/<name>/history.json`: one decision per night, in night order, and the rollbacks."""

    format: Literal["diffusion-pipeline/promotion-history@2"] = (
        "diffusion-pipeline/promotion-history@2"
    )
    decisions: list[PromotionDecision]
    rollbacks: list[Rollback] = []


# -- choosing the sampler -------------------------------------------------------------------------
class ScoredSetting(_Model):
    """One setting of a sampler sweep, scored on the sweep's shared seed ranges (lower is better)."""

    name: str  # 'dpmpp_2m, 20 steps, logsnr'
    sampler: str
    steps: int
    spacing: str
    guidance_scale: float
    eta: float
    nfe: int  # network evaluations per image
    values: list[float]  # the metric of each seed range
    mean: float
    std: float | None  # None with one seed range: no noise measured
    samples_key: str
    metrics_key: str
    within_noise: bool  # a paired test cannot call it worse than the best
    best: bool
    chosen: bool  # the cheapest (fewest NFE) within the noise of the best
    command: str  # the command line that uses it
    problems: list[str] = []  # why its score must not be trusted (the evaluation's problems)


class SamplerChoice(Record):
    """A sampler sweep of one checkpoint (`runs/<id>/choices/samplers-<stamp>/choice.json`)."""

    format: Literal["diffusion-pipeline/sampler-choice@1"] = "diffusion-pipeline/sampler-choice@1"
    run_id: str
    step: int
    checkpoint_key: str
    stamp: str
    metric: MetricName
    alpha: float
    repeats: int
    num_images: int  # per seed range
    seed_ranges: list[tuple[int, int]]
    extractor: str
    comparable_with_published: bool  # the standard Inception weights
    settings: list[ScoredSetting]
    report_key: str
    report_html_key: str
    report_url: str
    created: str

    @property
    def chosen(self) -> ScoredSetting:
        return next(s for s in self.settings if s.chosen)

    @property
    def best(self) -> ScoredSetting:
        return next(s for s in self.settings if s.best)


# -- post-hoc EMA --------------------------------------------------------------------------------
class RebuiltEma(_Model):
    """EMAs rebuilt at `step` from the run's power-EMA snapshots, one checkpoint per target width;
    the snapshots used are those of the widths `snapshot_sigma_rels` at `snapshot_steps`."""

    run_id: str
    step: int
    checkpoints: list[Checkpoint]
    snapshot_sigma_rels: list[float]
    snapshot_steps: list[int]


class EmaCandidate(_Model):
    """One rebuilt EMA length as scored on the shared seed ranges."""

    sigma_rel: float
    checkpoint_key: str
    metrics_key: str
    fids: list[float]  # one per seed range
    fid: float | None
    fid_std: float | None
    within_noise: bool  # a paired test cannot call it worse than the best (the best included)
    problems: list[str] = []  # why its scores are not trusted: then it was not a candidate


class EmaChoice(Record):
    """`runs/<id>/choices/ema-<stamp>/choice.json`: the EMA lengths rebuilt at `step`, their FIDs
    on the same seed ranges, and the one chosen: the lowest mean FID (all lengths cost the same
    to sample), with those a paired t-test at `alpha` cannot tell from it."""

    format: Literal["diffusion-pipeline/ema-choice@1"] = "diffusion-pipeline/ema-choice@1"
    run_id: str
    step: int
    stamp: str
    alpha: float
    candidates: list[EmaCandidate]
    best: float  # sigma_rel with the lowest mean FID
    chosen: float
    snapshot_sigma_rels: list[float]
    snapshot_steps: list[int]
    sampling: SampleConfig
    num_images: int  # per seed range
    repeats: int
    seed_ranges: list[tuple[int, int]]
    num_reference_images: int | None
    extractor: ExtractorRecord
    report_url: str  # report.html, where the store has it
    created: str

    @property
    def prefix(self) -> str:
        return layout.ema_choice_prefix(self.run_id, self.stamp)

    @property
    def key(self) -> str:
        return layout.ema_choice_record(self.prefix)

    @property
    def report_key(self) -> str:
        return layout.ema_choice_report(self.prefix)

    @property
    def report_html_key(self) -> str:
        return layout.ema_choice_report_html(self.prefix)


# -- nightly -------------------------------------------------------------------------------------
class StageTiming(_Model):
    """One stage of a nightly: its wall time, what it did and what it used (`tasks.usage`)."""

    name: str
    seconds: float
    reused: bool | None = None  # its result already existed (None: the stage never reuses)
    detail: str
    usage: Usage | None = None  # None: recorded before usage was counted


class NightlySummary(Record):
    format: Literal["diffusion-pipeline/nightly@2"] = "diffusion-pipeline/nightly@2"
    run_id: str
    stamp: str
    dataset: str
    manifest_key: str
    shards_reused: bool
    step: int
    resumed_from: int | None
    trained_steps: int
    checkpoint_key: str
    samples_key: str
    metrics: Metrics
    promotion: PromotionDecision
    stages: list[StageTiming]
    report_key: str  # report.md
    report_html_key: str
    report_url: str  # of report.html
    cost: Cost | None = None  # the stages' usage at the configured `prices` (None: no prices)
    # With `evaluate.score_every`: the night's checkpoints scored while training ran; the
    # challenger is the best of them (`checkpoint_key`), confirmed by `metrics` on fresh seeds.
    scores: list[CheckpointScore] = []


# -- sweeps over training settings -----------------------------------------------------------------
SweepStatus = Literal["finished", "stopped", "budget", "not started", "running", "failed"]


class SegmentScore(_Model):
    """One segment of a sweep trial: trained up to `step` (the run's exact resume), then its
    checkpoint scored on the small seed ranges of `evaluate.score_*`, and what it cost."""

    step: int
    fid: float
    fid_std: float | None  # over the seed ranges; None with one range
    values: list[float]  # one per seed range
    num_images: int  # per seed range
    metrics_key: str
    checkpoint_key: str
    train_s: float  # wall seconds of the segment's training
    score_s: float  # wall seconds of its sampling and scoring
    device_s: float  # the device-seconds it reserved (`tasks.sweep.budget.segment_cost`)
    ended_at: float = 0.0  # when it was scored (Unix seconds): the sweep's progress over time


class SweepTrial(Record):
    """`sweeps/<name>/trials/<trial_id>.json`: one trial (an ordinary run, `run_id`) of a sweep,
    rewritten after each segment it finishes."""

    format: Literal["diffusion-pipeline/sweep-trial@1"] = "diffusion-pipeline/sweep-trial@1"
    sweep: str
    trial_id: str
    run_id: str
    settings: dict[str, float | int | str | bool | None]  # the searched fields, dotted
    seed: int  # train.seed
    config_id: str  # trials with the same settings (training-seed repeats) share it
    target_step: int
    segments: list[SegmentScore] = []
    starts: int = 0  # how many times the trial function started (1 unless resumed)
    budget_stop: bool = False  # ended because its next segment could cross the budget

    @property
    def step(self) -> int:
        return self.segments[-1].step if self.segments else 0

    @property
    def device_s(self) -> float:
        return sum(s.device_s for s in self.segments)


class TrialOutcome(_Model):
    """A trial as the sweep ended it: its record and how it ended."""

    trial: SweepTrial
    status: SweepStatus


class SeedSpread(_Model):
    """The final FIDs of one setting's training-seed repeats at the last step they all reached,
    beside the sampling noise (the mean std over seed ranges)."""

    config_id: str
    step: int
    fids: list[float]
    seed_std: float | None  # std over training seeds; None with one seed
    sampling_std: float | None


class SweepResult(Record):
    """`sweeps/<name>/sweep.json`: every trial, the budget, the winner and its confirmation."""

    format: Literal["diffusion-pipeline/sweep@1"] = "diffusion-pipeline/sweep@1"
    name: str
    scheduler: str  # 'asha (grace 2 segments, reduction 2)'
    budget_device_s: float | None
    device_unit: str  # 'CPU' or 'GPU'
    spent_device_s: float
    budget_note: str | None  # where the budget stopped the sweep; None when it did not
    trials: list[TrialOutcome]
    spreads: list[SeedSpread]
    winner: str | None  # trial id
    confirmation: Metrics | None  # the winner's final checkpoint at full n, evaluation seeds
    handoff: str | None  # the command that hands the winning run to the nightly
    report_key: str
    report_html_key: str
    report_url: str
    created: str
