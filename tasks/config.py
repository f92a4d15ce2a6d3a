"""Typed, validated configuration: one model per concern, one root that the CLI and flows share.

`load_config` resolves the config once, at load: the storage root becomes an absolute path or URL,
the S3 endpoint and region and the Ray address take their environment defaults. What `--dry-run`
prints and what a run saves beside its artifacts is that resolved config, and a config round-trips
through its JSON/YAML form (`PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg`).
"""

from __future__ import annotations

import os
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks import layout

DATASET_CHOICES = "digits, mnist, fashion-mnist, cifar10, imagefolder:PATH|URL"
_NAMED_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
_NATIVE_SIZES = {"digits": 8, "mnist": 28, "fashion-mnist": 28, "cifar10": 32}  # square, pixels
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeprecatedConfigWarning(FutureWarning):
    """A config names a field by its old name (`RENAMED`); it still works, for one release.
    A FutureWarning, as Python shows those to the people who run a program, not only to its
    developers."""


# Fields renamed for one naming across sections (issue 16), old name -> new name. Every stage
# that runs on a pool of Ray workers says `workers` (how many) and `cpus_per_worker` / `use_gpu`
# (what each holds); `train.loader_processes` are the local processes inside one training worker.
# `ray.num_cpus` keeps its name: it is the size of a local cluster, as `ray.init(num_cpus=...)`.
# The old names still load (YAML files, overrides, a run's saved config.json, stored records)
# until the next release; a config file or override that uses one gets a warning naming the new.
RENAMED: dict[str, dict[str, str]] = {
    "train": {"num_workers": "workers", "data_workers": "loader_processes"},
    "sample": {"num_workers": "workers", "cpus_per_task": "cpus_per_worker"},
    "evaluate": {"num_workers": "workers", "cpus": "cpus_per_worker"},
}


def _both_names(section: str, old: str, new: str) -> str:
    return (
        f"{section}.{old} and {section}.{new} are both set; {section}.{old} is the old name of "
        f"{section}.{new}: keep only {section}.{new}"
    )


def _renamed_note(section: str, old: str, new: str, where: str) -> str:
    return (
        f"{where}: {section}.{old} is deprecated, use {section}.{new} (the old name is read until "
        "the next release)"
    )


class _Frozen(BaseModel):
    # Strict: a value of the wrong type is an error, never converted ("10" is not a step count,
    # 1 is not `true`); an int is still a float. No setting means infinity or NaN.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    # The section's name in PipelineConfig, for its RENAMED fields.
    SECTION: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """A section written with old field names (a saved config, a stored record) reads as new."""
        renames = RENAMED.get(cls.SECTION or "", {})
        if not isinstance(data, dict) or not renames.keys() & data.keys():
            return data
        out = dict(data)
        for old, new in renames.items():
            if old in out:
                if new in out:
                    raise ValueError(_both_names(cls.SECTION or "", old, new))
                out[new] = out.pop(old)
        return out


def _list_to_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


T = TypeVar("T")
# YAML and JSON have lists, not tuples: a list is the tuple's written form.
Tuple = Annotated[tuple[T, ...], BeforeValidator(_list_to_tuple)]


class StorageConfig(_Frozen):
    """Where artifacts live. `root` is an fsspec URL: `./artifacts`, `file:///abs/path`, `s3://bucket/prefix`.

    S3 credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, AWS_PROFILE) or an instance role; they are never stored in config files or
    artifacts. `retry_budget_s` is the patience of the one retry policy (`tasks.retry`).
    """

    root: str = Field(
        default="./artifacts",
        description="a local path (taken literally, whatever characters it holds), file:///abs/path or s3://bucket/prefix",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, Ceph RGW); defaults to $AWS_ENDPOINT_URL, else AWS.",
    )
    region: str | None = Field(
        default=None, description="S3 region; defaults to $AWS_REGION / $AWS_DEFAULT_REGION"
    )
    retry_budget_s: float = Field(
        default=120.0,
        ge=0,
        description="S3: how long one store call retries an outage (connection refused or reset, "
        "timeouts, throttling, 5xx) with backoff before the run fails with an error naming the "
        "endpoint; 0 = no retries",
    )

    @field_validator("root")
    @classmethod
    def _root_scheme(cls, v: str) -> str:
        if not v.strip():
            raise ValueError(
                "storage root is empty; give a local folder (e.g. ./artifacts) or s3://bucket/prefix"
            )
        scheme = v.split("://", 1)[0] if "://" in v else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(
                f"storage root {v!r} has unsupported scheme {scheme!r}; use a local path, file://... or s3://bucket/prefix"
            )
        if scheme == "s3" and not v[len("s3://") :].split("/", 1)[0]:
            raise ValueError(f"storage root {v!r} names no bucket; use s3://bucket/prefix")
        if scheme == "file" and v.startswith("file://") and not v[len("file://") :].startswith("/"):
            raise ValueError(f"storage root {v!r}: a file:// URL needs an absolute path")
        return v.rstrip("/") or v

    @property
    def is_local(self) -> bool:
        return not self.root.startswith("s3://")


class DataConfig(_Frozen):
    dataset: str = Field(default="digits", description=f"one of: {DATASET_CHOICES}")
    root: str | None = Field(
        default=None,
        description="local root in torchvision's layout for mnist/fashion-mnist/cifar10",
    )
    source_split: Literal["train", "test"] = Field(
        default="train",
        description="which split of a torchvision dataset to read (train/holdout are cut from it)",
    )
    download: bool = Field(
        default=False, description="let torchvision download the dataset (needs network)"
    )
    image_size: int | None = Field(
        default=None,
        ge=4,
        le=1024,
        description="resize to this square size; None keeps the native size",
    )
    channels: Literal[1, 3] | None = Field(
        default=None,
        description="1 = grayscale, 3 = RGB shards; None = the source's own (imagefolder: RGB)",
    )
    holdout_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="share of images in the holdout split, chosen by a hash of each image's key",
    )
    samples_per_shard: int = Field(
        default=512,
        ge=1,
        description="mean images per shard (shard boundaries depend on the images' keys, so "
        "between samples_per_shard/2 and 4 x samples_per_shard)",
    )
    max_images: int | None = Field(
        default=None, ge=2, description="cap the source size (quick runs)"
    )
    seed: int = Field(default=0, description="salts the train/holdout hash")
    hflip: bool = Field(
        default=False,
        description="training: mirror each image left-right with probability 1/2, seeded by "
        "(train.seed, rank, step); off for digits and text",
    )
    on_bad_file: Literal["fail", "skip"] = Field(
        default="fail",
        description="an unreadable or invalid image: fail naming the file, or skip it (counted, "
        "and listed in the manifest with the reason)",
    )
    on_empty_class: Literal["fail", "skip"] = Field(
        default="fail",
        description="an imagefolder class folder without images: fail, or skip it (it is no class)",
    )
    workers: int | None = Field(
        default=None,
        ge=0,
        description="shard tasks at once on Ray (one CPU each); 0 = write in this process; None = "
        "imagefolder sources on every CPU of the Ray cluster, the in-memory datasets in this process",
    )

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, v: str) -> str:
        if v in _NAMED_DATASETS:
            return v
        if v.startswith("imagefolder:") and len(v) > len("imagefolder:"):
            url = v.split(":", 1)[1]
            scheme = url.split("://", 1)[0] if "://" in url else "file"
            if scheme not in ("file", "s3"):
                raise ValueError(
                    f"dataset {v!r}: unsupported scheme {scheme!r}; use imagefolder:PATH, "
                    "imagefolder:file:///abs/path or imagefolder:s3://bucket/prefix"
                )
            return v
        raise ValueError(f"dataset {v!r} unknown; choose one of: {DATASET_CHOICES}")


class ModelConfig(_Frozen):
    """The denoiser and its diffusion process. Image size and channels come from the dataset manifest."""

    base_channels: int = Field(default=32, ge=8)
    channel_mult: Tuple[int] = (1, 2)
    num_res_blocks: int = Field(default=1, ge=1)
    attention_resolutions: Tuple[int] = (4,)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_conditional: bool = False
    schedule: Literal["linear", "cosine", "scaled_linear"] = "linear"
    num_timesteps: int = Field(default=1000, ge=2)
    prediction_type: Literal["epsilon", "v", "x0"] = "epsilon"


# diffusion_core.phema.MAX_SIGMA_REL (1/sqrt(12)), without importing torch into the config.
PHEMA_MAX_SIGMA_REL = 12.0**-0.5
# The widths `diffpipe ema` rebuilds and scores unless told: around EDM2's two kept ones.
EMA_CHOICE_SIGMA_RELS = (0.03, 0.05, 0.07, 0.10, 0.15)


def check_sigma_rels(values: Sequence[float], what: str) -> tuple[float, ...]:
    """Power-EMA widths as EDM2 defines them: each in (0, 1/sqrt(12)), none twice (`what` names
    the setting in the message)."""
    out = tuple(float(v) for v in values)
    bad = [v for v in out if not 0.0 < v < PHEMA_MAX_SIGMA_REL]
    if bad:
        raise ValueError(
            f"{what}={list(out)}: each sigma_rel must be in (0, {PHEMA_MAX_SIGMA_REL:.4f}), "
            f"{', '.join(map(str, bad))} is not (EDM2 keeps 0.05 and 0.10)"
        )
    if len(set(out)) != len(out):
        raise ValueError(f"{what}={list(out)} names a sigma_rel twice; list each once")
    return out


class TrainConfig(_Frozen):
    SECTION: ClassVar[str | None] = "train"

    run_id: str = Field(
        default="nightly", description="checkpoints live under runs/<run_id>/; same id = resume"
    )
    steps: int = Field(
        default=600,
        ge=1,
        description="total optimizer steps of the run (a resumed run continues up to it)",
    )
    steps_per_night: int | None = Field(
        default=600,
        ge=1,
        description="nightly: train this many steps past the latest checkpoint (at least up to `steps`); null = stop at `steps`",
    )
    batch_size: int = Field(default=64, ge=1, description="per worker")
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    ema_decay: float = Field(default=0.995, ge=0.0, lt=1.0)
    ema_warmup_steps: int = Field(default=100, ge=0)
    min_snr_gamma: float | None = Field(default=None, gt=0)
    label_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    phema_sigma_rels: Tuple[float] = Field(
        default=(),
        description="post-hoc EMA (EDM2): keep snapshots of power-function EMAs of these "
        "relative widths, e.g. [0.05, 0.10], so `diffpipe ema` can rebuild any other width "
        "after training; each in (0, 0.2887); empty = off",
    )
    phema_every: int | None = Field(
        default=None,
        ge=1,
        description="write one snapshot per phema_sigma_rels entry every this many steps (and "
        "at the run's last step); None = train.checkpoint_every",
    )
    log_every: int = Field(default=50, ge=1)
    shuffle_buffer: int = Field(default=1000, ge=1)
    workers: int = Field(
        default=2,
        ge=1,
        description="Ray Train workers (DDP ranks), each holding cpus_per_worker CPUs and, with "
        "use_gpu, one GPU (was train.num_workers)",
    )
    max_failures: int = Field(
        default=2,
        ge=-1,
        description="restarts of the worker group after a worker error or a lost node (a machine gone without notice, OOM); each resumes from the last checkpoint; -1 = unlimited",
    )
    max_preemptions: int = Field(
        default=-1,
        ge=-1,
        description="restarts after a node drained for preemption (a spot reclaim with notice), "
        "counted apart from max_failures: each resumes from the just-in-time checkpoint saved "
        "during the drain, so each makes progress; -1 = unlimited (Ray Train's "
        "FailureConfig.max_preemption_failures)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="where Ray puts the workers: PACK (fewest nodes), SPREAD (as many nodes as "
        "it can), STRICT_SPREAD (each on its own node)",
    )
    loader_processes: int = Field(
        default=1,
        ge=0,
        description="background processes inside each worker that read, decode, flip and batch "
        "its data; 0 = on the training thread (was train.data_workers)",
    )
    use_gpu: bool = Field(default=False, description="one GPU per worker")
    cpus_per_worker: float = Field(
        default=1.0, gt=0, description="CPUs each worker holds (its torch threads)"
    )
    bf16: bool = Field(default=False, description="bf16 autocast (GPU)")
    channels_last: bool = Field(
        default=True,
        description="NHWC weights and activations: faster convolutions (oneDNN on CPU, measured "
        "8-15% less time a step on the benchmark and Quickstart networks; cuDNN on GPU)",
    )
    compile: bool = False
    seed: int = 0

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not _RUN_ID.match(v) or ".." in v:
            raise ValueError(
                f"run_id {v!r} must be 1-64 characters of letters, digits, '.', '_' or '-' (no '..')"
            )
        return v

    @field_validator("phema_sigma_rels")
    @classmethod
    def _phema_sigma_rels(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return check_sigma_rels(v, "train.phema_sigma_rels")

    @property
    def phema_interval(self) -> int:
        """Steps between two power-EMA snapshots."""
        return self.phema_every or self.checkpoint_every


class SampleConfig(_Frozen):
    SECTION: ClassVar[str | None] = "sample"

    num_images: int = Field(default=128, ge=1, description="per evaluate.repeats range")
    sampler: Literal["ddpm", "ddim", "dpmpp_2m", "heun"] = "ddim"
    steps: int = Field(default=50, ge=1)
    spacing: Literal["leading", "trailing", "linspace", "logsnr", "karras"] = Field(
        default="trailing",
        description="timestep spacing; logsnr (uniform in log-SNR, DPM-Solver) suits dpmpp_2m, karras (EDM) suits heun",
    )
    eta: float = Field(default=0.0, ge=0.0)
    guidance_scale: float = Field(default=1.0, ge=0.0)
    seed_start: int = Field(default=0, ge=0, description="image i gets seed seed_start + i")
    images_per_task: int = Field(
        default=128,
        ge=1,
        description="images per seed range: one unit of an actor's work and one output shard",
    )
    batch_size: int = Field(default=64, ge=1)
    use_gpu: bool = Field(default=False, description="one GPU per worker")
    cpus_per_worker: float = Field(
        default=1.0,
        gt=0,
        description="CPUs each worker holds (its torch threads) (was sample.cpus_per_task)",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="sampling workers (Ray actors, each loads the weights once); None = as many "
        "as the cluster fits (one per GPU with use_gpu), at most one per seed range (was "
        "sample.num_workers)",
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        description="restarts of a sampling actor whose process died (lost node, OOM); its "
        "unfinished range is re-run and writes the same bytes",
    )
    use_ema: bool = True
    clip_x0: bool = Field(
        default=True,
        description="clamp the predicted clean image to the data range [-1, 1] at every step (as "
        "DDPM's and DDIM's reference code and diffusers' clip_sample do); without it a "
        "deterministic sampler turns some starting noises into saturated noise images",
    )
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    # The settings that change the images (the others only change how fast they are made): they
    # name a sample set, and two evaluations are comparable only when they agree on them.
    IMAGE_SETTINGS: ClassVar[tuple[str, ...]] = (
        "sampler",
        "steps",
        "spacing",
        "eta",
        "guidance_scale",
        "seed_start",
        "num_images",
        "use_ema",
        "clip_x0",
        "bf16",
    )

    def image_settings(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.IMAGE_SETTINGS}


class EvalConfig(_Frozen):
    SECTION: ClassVar[str | None] = "evaluate"

    metrics: Tuple[Literal["fid", "kid", "isc", "prc", "memorization", "fd_dinov2"]] = Field(
        default=("fid", "kid"),
        description="besides fid/kid/isc: prc (precision and recall), memorization (share of "
        "samples nearer the training set than held-out images are), fd_dinov2 (needs "
        "evaluate.dinov2_weights; skipped with one line without them)",
    )
    inception_weights: str | None = Field(
        default=None,
        description="path or URL of torch-fidelity's InceptionV3 weights (pt_inception-2015-12-05); None = its standard download",
    )
    on_missing_weights: Literal["error", "stand-in"] = Field(
        default="stand-in",
        description="when the standard weights cannot be had: stop with an error, or continue with a labelled seeded stand-in",
    )
    standin_seed: int = 0
    max_training_images: int = Field(
        default=1000,
        ge=1,
        description="training images whose features the memorization check compares samples "
        "with (the first ones of the training split; extracted once and cached)",
    )
    memorization_quantile: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="a sample counts as memorized when nearer the training set than this "
        "quantile of the held-out images' nearest-training distances (expected share of a "
        "model that does not memorize: this value)",
    )
    dinov2_weights: str | None = Field(
        default=None,
        description="path or URL of the DINOv2 ViT-S/14 weights (dinov2_vits14_pretrain.pth) for "
        "FD-DINOv2, with facebookresearch/dinov2's hub code in torch.hub's folder; None = "
        "FD-DINOv2 skipped (nothing is downloaded)",
    )
    repeats: int = Field(
        default=3,
        ge=1,
        description="score k disjoint seed ranges of sample.num_images each; the metrics carry every FID, their mean and standard deviation (the noise promotion weighs)",
    )
    max_reference_images: int | None = Field(default=None, ge=2)
    batch_size: int = Field(default=32, ge=1)
    kid_subset_size: int = Field(default=100, ge=2)
    grid_images: int = Field(default=64, ge=1)
    use_gpu: bool = Field(
        default=False, description="extract the Inception features on Ray workers with one GPU each"
    )
    cpus_per_worker: float = Field(
        default=1.0,
        gt=0,
        description="CPUs each feature-extraction worker holds (its torch threads) (was "
        "evaluate.cpus)",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="feature-extraction workers (Ray actors, each loads the extractor once); "
        "None = as many as the cluster fits (one per GPU with use_gpu), at most one per shard "
        "(was evaluate.num_workers)",
    )
    score_every: int = Field(
        default=0,
        ge=0,
        description="while training runs, score every k-th checkpoint (and the last) with a "
        "small sample set on one sampling and one feature worker of their own; the nightly's "
        "challenger is then the best-scored checkpoint of the night, confirmed at full n on "
        "the evaluation's own seed ranges before the gate; 0 = off",
    )
    score_images: int = Field(
        default=64, ge=2, description="images per seed range when scoring during training"
    )
    score_repeats: int = Field(
        default=2, ge=1, description="seed ranges per checkpoint when scoring during training"
    )
    score_seed_start: int = Field(
        default=1_000_000_000,
        ge=0,
        description="first seed of the ranges scored during training: they must not overlap "
        "the evaluation's (sample.seed_start on), so that the confirmation is on fresh seeds",
    )


class PromoteConfig(_Frozen):
    model_name: str = Field(
        default="default", description="the name the promoted model is kept under in the store"
    )
    metric: Literal["fid", "kid"] = "fid"
    alpha: float = Field(
        default=0.05,
        gt=0.0,
        lt=0.5,
        description="the challenger must beat the champion by more than the measured noise: a "
        "one-sided paired t-test over the evaluate.repeats seed ranges (both models scored on "
        "the same ranges) at this false-promotion rate",
    )
    min_improvement: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="also require the metric to fall by at least this fraction of the champion's "
        "(e.g. 0.05); the only bar when no noise was measured (evaluate.repeats=1): None = never "
        "promote over a champion without measured noise",
    )
    max_memorized_share: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="refuse a model when more than this share of its samples is nearer the "
        "training set than held-out images are (evaluate.metrics memorization; a model that "
        "does not memorize scores about evaluate.memorization_quantile)",
    )

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return layout.part(v, "model_name")


class RayConfig(_Frozen):
    address: str | None = Field(
        default=None,
        description="Ray cluster address; defaults to $RAY_ADDRESS, else a local cluster",
    )
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="CPUs of the local cluster this process starts when no address is given "
        "(ray.init's num_cpus; None = all); the stages' own sizes are <section>.workers and "
        "<section>.cpus_per_worker",
    )
    worker_logs: bool = Field(
        default=False,
        description="forward the Ray workers' own output to this console (diffpipe -v sets it); progress is shown either way",
    )
    autoscaling: bool = Field(
        default=False,
        description="the cluster grows on demand: wait for resources it does not have yet instead of failing at once",
    )


class LeaseConfig(_Frozen):
    """One writer per run (`tasks.lease`): how long a lease outlives its holder's last renewal."""

    timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="a run's or a model's lease expires this long after its holder last renewed "
        "it (every third of it): a crashed run's lease is taken over after at most this long",
    )


# The kinds of object-store request a night counts (`tasks.usage`) and `prices` prices.
RequestKind = Literal["list", "get", "head", "put", "part", "delete", "other"]


class PricesConfig(_Frozen):
    """What the cluster and the store charge, for the nightly report's cost line (README: Cost).
    Unset kinds cost nothing."""

    currency: str = "USD"
    gpu_hour: float = Field(default=0.0, ge=0, description="per GPU-hour reserved")
    cpu_hour: float = Field(default=0.0, ge=0, description="per CPU-hour used")
    per_1000_requests: dict[RequestKind, float] = Field(
        default_factory=dict,
        description="per 1,000 object-store requests, by kind (list, get, head, put, part, "
        "delete, other), e.g. {put: 0.005, part: 0.005, list: 0.005, get: 0.0004}",
    )
    gb_month: float = Field(default=0.0, ge=0, description="per GB (1e9 bytes) stored a month")

    @field_validator("per_1000_requests")
    @classmethod
    def _not_negative(cls, v: dict[str, float]) -> dict[str, float]:
        negative = {k: p for k, p in v.items() if p < 0}
        if negative:
            raise ValueError(f"request prices must not be negative: {negative}")
        return v


class RetentionConfig(_Frozen):
    """What the store keeps (`tasks/retention/`, README: Retention): applied at the end of each
    nightly when `enabled`, and by `diffpipe gc [--dry-run]`. The champion, its rollback chain's
    checkpoint copies, the last `train.keep_checkpoints` checkpoints of each run, the last
    `keep_nights` nights' sample sets, features, evaluations and report images, the reference
    statistics of the datasets those nights used and the shards their manifests name are kept;
    every other such artifact is deleted once nothing wrote to it for `grace_hours`."""

    enabled: bool = Field(
        default=True,
        description="apply the policy at the end of each nightly (`diffpipe gc` applies it either way)",
    )
    keep_nights: int = Field(
        default=7,
        ge=1,
        description="nights per run whose sample sets, features, evaluations and report images are kept",
    )
    grace_hours: float = Field(
        default=48.0,
        ge=0,
        description="nothing written more recently than this is deleted (what a running job may "
        "still read: a shard set being replaced, a sample set being scored)",
    )
    rollback_depth: int | None = Field(
        default=None,
        ge=1,
        description="earlier champions along the rollback chain whose checkpoint copies are kept "
        "(`diffpipe promote --rollback` goes back this far); None = every promoted model's copy",
    )


class PipelineConfig(_Frozen):
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvalConfig = EvalConfig()
    promote: PromoteConfig = PromoteConfig()
    ray: RayConfig = RayConfig()
    lease: LeaseConfig = LeaseConfig()
    prices: PricesConfig | None = None  # None: no cost line
    retention: RetentionConfig = RetentionConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.sample.steps > self.model.num_timesteps:
            raise ValueError(
                f"sample.steps={self.sample.steps} exceeds model.num_timesteps={self.model.num_timesteps}; lower sample.steps"
            )
        if self.sample.guidance_scale != 1.0 and not self.model.class_conditional:
            raise ValueError("sample.guidance_scale != 1 needs model.class_conditional=true")
        e, sc = self.evaluate, self.sample
        if e.score_every:
            scored = (e.score_seed_start, e.score_seed_start + e.score_repeats * e.score_images)
            evaluated = (sc.seed_start, sc.seed_start + e.repeats * sc.num_images)
            if scored[0] < evaluated[1] and evaluated[0] < scored[1]:
                raise ValueError(
                    f"the seeds scored during training [{scored[0]}, {scored[1]}) overlap the "
                    f"evaluation's [{evaluated[0]}, {evaluated[1]}): the best checkpoint would "
                    "be confirmed on the seeds that chose it; move evaluate.score_seed_start "
                    "past the evaluation's seeds"
                )
            if e.score_images > sc.num_images:
                raise ValueError(
                    f"evaluate.score_images={e.score_images} exceeds sample.num_images="
                    f"{sc.num_images}: the confirmation must score at least as many images as "
                    "the selection; lower evaluate.score_images"
                )
        return self


# What the UNet rejects (diffusion_core.unet.UNetConfig's field) -> the config fields that set it.
_NETWORK_FIELDS = {
    "image_size": ("data.image_size", "model.channel_mult"),
    "attention_resolutions": ("model.attention_resolutions", "data.image_size"),
    "base_channels": ("model.base_channels",),
    "groups": ("model.base_channels", "model.channel_mult"),
}


def _shown(cfg: PipelineConfig, name: str, size: int) -> str:
    if name == "data.image_size" and cfg.data.image_size is None:
        return f"None ({cfg.data.dataset}: {size}x{size})"
    section, field = name.split(".")
    value = getattr(getattr(cfg, section), field)
    return str(list(value)) if isinstance(value, tuple) else str(value)


def check_network(cfg: PipelineConfig) -> None:
    """Fail, naming the fields, when the data and model sections build no network, before anything
    starts (training would fail on its workers). The image size is `data.image_size`, else the
    named dataset's own; an imagefolder's is known only once it is sharded."""
    from diffusion_core.unet import UNetConfig  # torch: only where a network is to be built

    size = cfg.data.image_size or _NATIVE_SIZES.get(cfg.data.dataset)
    if size is None:
        return
    m = cfg.model
    try:
        UNetConfig(
            image_size=size,
            base_channels=m.base_channels,
            channel_mult=tuple(m.channel_mult),
            num_res_blocks=m.num_res_blocks,
            attention_resolutions=tuple(m.attention_resolutions),
            dropout=m.dropout,
        )
    except ValueError as err:
        found = re.match(r"UNetConfig\.(\w+)=.* is invalid: (.*)", str(err), re.DOTALL)
        names = _NETWORK_FIELDS.get(found.group(1), ()) if found else ()
        if found is None or not names:
            raise ConfigError(f"data and model settings build no network: {err}") from None
        given = ", ".join(f"{n}={_shown(cfg, n, size)}" for n in names)
        raise ConfigError(
            f"{given} build no network: {found.group(2)}; change {' or '.join(names)}"
        ) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string (its floats need a dot); configs mean a number.

    A key given twice is an error naming both lines (YAML would keep the last one, silently), and
    so is an alias: a config is small enough to write out, and a few nested aliases expand into
    billions of nodes ("billion laughs") before any field is checked."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"the alias *{event.anchor} is not allowed in a config; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if (
                not isinstance(key_node, yaml.ScalarNode)
                or key_node.tag == "tag:yaml.org,2002:merge"
            ):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key!r} is given twice, on line {first_line[key]} and on line {line}; "
                    "keep one",
                    key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:  # the document as YAML gives it; PipelineConfig checks it
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(text: str) -> Any:
    """A YAML document read as a config file is (`1e-4` a number, no duplicate keys, no aliases):
    for files beside the config that hold config values, e.g. a sweep's search space."""
    return _load_yaml(text)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the field."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:  # the YAML tree
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def _field(dotted: str) -> Any:
    """The annotation of the field `section.field` names (old names included), else None."""
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in PipelineConfig.model_fields:
        return None
    section, name = parts
    model = PipelineConfig.model_fields[section].annotation
    name = RENAMED.get(section, {}).get(name, name)
    info = (
        model.model_fields.get(name)
        if isinstance(model, type) and issubclass(model, BaseModel)
        else None
    )
    return None if info is None else info.annotation


def _is_text(annotation: Any) -> tuple[bool, bool]:
    """(the field holds text, it may be None): `str`, a Literal of strings, either or None."""
    args = (
        get_args(annotation)
        if get_origin(annotation) in (Union, types.UnionType)
        else (annotation,)
    )
    kinds = [a for a in args if a is not type(None)]
    text = len(kinds) == 1 and (
        kinds[0] is str
        or (get_origin(kinds[0]) is Literal and all(isinstance(v, str) for v in get_args(kinds[0])))
    )
    return text, len(kinds) < len(args)


_YAML_NULLS = ("null", "Null", "NULL", "~")


def parse_override(item: str) -> tuple[str, Any]:
    """`train.steps=100` -> ("train.steps", 100): the value is parsed as YAML (numbers, lists,
    null), except where the field holds text: there it is taken literally (`storage.root=./a #2`
    is the folder `./a #2`, not `./a` and a YAML comment), unless it is quoted as a whole
    ('"..."' or "'...'") or is null for a field that may be None."""
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} must look like section.field=value, e.g. train.steps=100"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty field name")
    if not raw.strip():
        return key, raw
    text, optional = _is_text(_field(key))
    if text and optional and raw in _YAML_NULLS:
        return key, None
    if text:
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        try:
            value = _load_yaml(raw) if quoted else None
        except yaml.YAMLError:
            value = None  # e.g. 'a' and 'b': not one quoted string, so text as it is
        return key, value if isinstance(value, str) else raw
    try:
        return key, _load_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); "
            "quote it, e.g. section.field='\"a: b\"'"
        ) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def resolve_storage(cfg: StorageConfig, env: Mapping[str, str] | None = None) -> StorageConfig:
    """A local root becomes a plain absolute path (Ray workers run in other directories; the path
    is taken literally, never URL-decoded); an S3 root gets its endpoint and region from `env`."""
    env = os.environ if env is None else env
    if cfg.is_local:
        path = cfg.root.removeprefix("file://")
        return cfg.model_copy(
            update={
                "root": str(Path(path).expanduser().absolute()),
                "endpoint_url": None,
                "region": None,
            }
        )
    endpoint = cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    return cfg.model_copy(update={"endpoint_url": endpoint or None, "region": region or None})


def resolve_config(cfg: PipelineConfig, env: Mapping[str, str] | None = None) -> PipelineConfig:
    """The config as it will run: storage resolved, the Ray address from $RAY_ADDRESS."""
    env = os.environ if env is None else env
    ray = cfg.ray.model_copy(update={"address": cfg.ray.address or env.get("RAY_ADDRESS") or None})
    return cfg.model_copy(update={"storage": resolve_storage(cfg.storage, env), "ray": ray})


def _new_names(tree: dict[str, Any], where: str) -> list[str]:
    """Rename the old field names (`RENAMED`) of a config file's tree in place; the warnings."""
    notes = []
    for section, renames in RENAMED.items():
        fields = tree.get(section)
        if not isinstance(fields, dict):
            continue
        for old, new in renames.items():
            if old not in fields:
                continue
            if new in fields:
                raise ConfigError(f"{where}: {_both_names(section, old, new)}")
            fields[new] = fields.pop(old)
            notes.append(_renamed_note(section, old, new, where))
    return notes


def _new_key(dotted: str, item: str, notes: list[str]) -> str:
    """An override's field under its new name (a warning noted when it used the old one)."""
    section, _, name = dotted.partition(".")
    new = RENAMED.get(section, {}).get(name)
    if new is None:
        return dotted
    notes.append(_renamed_note(section, name, new, f"override {item!r}"))
    return f"{section}.{new}"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Defaults < YAML file < `section.field=value` overrides, validated as one PipelineConfig and
    resolved against the environment (`resolve_config`). An old field name (`RENAMED`) still
    works, with a `DeprecatedConfigWarning` naming the new one; both names in one file, or both
    in the overrides, is an error."""
    notes: list[str] = []
    tree: dict[str, Any] = {}  # the YAML document: a tree of sections, checked by PipelineConfig
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            loaded = _load_yaml(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file {str(p)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8"
            ) from None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"config file {str(p)!r} is not valid YAML: {_yaml_problem(err)}"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}"
            )
        tree = loaded or {}
        source = str(p)
        notes += _new_names(tree, f"config file {source!r}")
    spelled: dict[str, str] = {}  # override field (new name) -> as the first override wrote it
    for item in overrides or []:
        key, value = parse_override(item)
        new = _new_key(key, item, notes)
        first = spelled.setdefault(new, key)
        if first != key:  # the old name and the new one
            section, old = (first if first != new else key).split(".", 1)
            raise ConfigError(f"overrides: {_both_names(section, old, new.split('.', 1)[1])}")
        _set_dotted(tree, new, value)
    if overrides:
        source += " + overrides"
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    for note in notes:  # only for a config that loads: an error says enough
        warnings.warn(note, DeprecatedConfigWarning, stacklevel=2)
    return resolve_config(cfg)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
