"""The artifact layout: every object-store key the pipeline reads or writes is built here.

Keys are '/'-separated paths below `storage.root`. Each name that becomes part of a key (a run id,
a dataset name, a model name, a fingerprint) is checked by `part`, so no configured or recorded
value can climb out of its folder (`../`) or split into sub-folders. The README's "Artifact
layout" section is tested against these functions (tests/unit/test_layout.py).

    datasets/<name>-<set12>/{train,holdout}-<chunk16>.tar ... manifest.json
    runs/<run_id>/config.json
    runs/<run_id>/checkpoints/step-00000600.pt  latest.json
    runs/<run_id>/samples/<set>/weights.pt  weights.json  shard-000000.tar  shard-000000.json  manifest.json
    runs/<run_id>/samples/<set>/features/<extractor sha16>/shard-000000.npz
    runs/<run_id>/eval/<set>/metrics.json  grid.png  report.md
    runs/<run_id>/nightly/<stamp>/report.md  report.html  {grid,loss,fid}.png  summary.json
    runs/<run_id>/nightly/latest.json
    runs/<run_id>/phema/snapshots/sigma-<sigma_rel>-step-00000600.pt
    runs/<run_id>/phema/rebuilt/sigma-<sigma_rel>-step-00000600.pt  .json
    runs/<run_id>/choices/ema-<stamp>/report.md  report.html  choice.json
    runs/<run_id>/choices/samplers-<stamp>/report.md  report.html  fid.png  choice.json
    stats/<dataset fingerprint>/<extractor sha16>-n<count>.npz
    extractors/<weights file>
    models/<name>/current.json  history.json  step-<step>.pt  step-<step>.json
    runs/<run_id>/lease/lease.json  claim-<token>.json     models/<name>/lease/ (the same)
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

Split = Literal["train", "holdout"]
SPLITS: tuple[Split, ...] = ("train", "holdout")

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def part(value: str, what: str) -> str:
    """`value` as one path component of a key, or a ValueError naming `what` and the rule."""
    if not isinstance(value, str) or not _PART.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} cannot be part of a storage key: use 1-128 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit, and no '..'"
        )
    return value


def _index(n: int) -> str:
    if n < 0:
        raise ValueError(f"shard index {n} is negative")
    return f"{n:06d}"


def _step(step: int) -> str:
    if step < 0:
        raise ValueError(f"step {step} is negative")
    return f"{step:08d}"


# -- datasets ------------------------------------------------------------------------------------
def datasets_root() -> str:
    """The folder of every shard set (what retention lists to find shards no manifest names)."""
    return "datasets"


def dataset_prefix(name: str, shard_set: str) -> str:
    """The folder every version of a source shares (`shard_set`: source + shard settings)."""
    return f"{datasets_root()}/{part(name, 'dataset name')}-{part(shard_set, 'shard set')[:12]}"


def dataset_manifest(prefix: str) -> str:
    return f"{prefix}/manifest.json"


def dataset_shard(prefix: str, split: Split, chunk: str) -> str:
    """Named by its listing chunk's hash, not a position: growing the source adds shards beside
    the kept ones instead of renumbering them."""
    return f"{prefix}/{split}-{part(chunk, 'chunk id')[:16]}.tar"


# -- runs: config, checkpoints -------------------------------------------------------------------
def runs_root() -> str:
    """The folder of every training run."""
    return "runs"


def run_prefix(run_id: str) -> str:
    return f"{runs_root()}/{part(run_id, 'run id')}"


def run_config(run_id: str) -> str:
    return f"{run_prefix(run_id)}/config.json"


def checkpoints_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/checkpoints"


def checkpoint(run_id: str, step: int) -> str:
    return f"{checkpoints_prefix(run_id)}/step-{_step(step)}.pt"


def latest_checkpoint(run_id: str) -> str:
    return f"{checkpoints_prefix(run_id)}/latest.json"


def train_history(run_id: str) -> str:
    """Every logging window of the run so far (a `TrainHistory` record, rewritten by rank 0)."""
    return f"{run_prefix(run_id)}/logs/history.json"


def tensorboard_prefix(run_id: str) -> str:
    """TensorBoard event files of the run: `tensorboard --logdir <storage.root>/<this>`."""
    return f"{run_prefix(run_id)}/tensorboard"


def tensorboard_file(run_id: str, filename: str) -> str:
    """One TensorBoard event file (`events.out.tfevents.*`) of the run."""
    return f"{tensorboard_prefix(run_id)}/{part(filename, 'event file name')}"


# -- post-hoc EMA: power-EMA snapshots, EMAs rebuilt from them, the choice of a length ----------
def _sigma(sigma_rel: float) -> str:
    """A power-EMA width as a key part, exactly (`repr` round-trips a float): `sigma-0.05`."""
    if not 0.0 < sigma_rel < 1.0:
        raise ValueError(f"power-EMA sigma_rel {sigma_rel!r} is not in (0, 1)")
    return part(f"sigma-{float(sigma_rel)!r}", "sigma_rel")


def phema_snapshots_prefix(run_id: str) -> str:
    """Every power-EMA snapshot of the run (checkpoint pruning never touches them)."""
    return f"{run_prefix(run_id)}/phema/snapshots"


def phema_snapshot(run_id: str, sigma_rel: float, step: int) -> str:
    """The power-function EMA of width `sigma_rel` after step `step` (weights only)."""
    return f"{phema_snapshots_prefix(run_id)}/{_sigma(sigma_rel)}-step-{_step(step)}.pt"


def phema_snapshot_of(run_id: str, key: str) -> tuple[float, int] | None:
    """(sigma_rel, step) of a key `phema_snapshot(run_id, ...)` built, else None."""
    found = re.fullmatch(
        re.escape(phema_snapshots_prefix(run_id)) + r"/sigma-([0-9.e+-]+)-step-(\d+)\.pt", key
    )
    if found is None:
        return None
    try:
        sigma_rel, step = float(found.group(1)), int(found.group(2))
    except ValueError:
        return None
    return (sigma_rel, step) if key == phema_snapshot(run_id, sigma_rel, step) else None


def phema_rebuilt(run_id: str, sigma_rel: float, step: int) -> str:
    """An EMA of width `sigma_rel` at step `step`, rebuilt from the snapshots: a checkpoint."""
    return f"{run_prefix(run_id)}/phema/rebuilt/{_sigma(sigma_rel)}-step-{_step(step)}.pt"


def phema_rebuilt_record(run_id: str, sigma_rel: float, step: int) -> str:
    """The `Checkpoint` record of `phema_rebuilt(run_id, sigma_rel, step)`."""
    return f"{run_prefix(run_id)}/phema/rebuilt/{_sigma(sigma_rel)}-step-{_step(step)}.json"


def ema_choice_prefix(run_id: str, stamp: str) -> str:
    """One `diffpipe ema` choice of an EMA length (`stamp`: when it ran, as `night_stamp`)."""
    return f"{run_prefix(run_id)}/choices/ema-{part(stamp, 'choice stamp')}"


def ema_choice_report(prefix: str) -> str:
    return f"{prefix}/report.md"


def ema_choice_report_html(prefix: str) -> str:
    return f"{prefix}/report.html"


def ema_choice_record(prefix: str) -> str:
    """The `EmaChoice` record the report renders."""
    return f"{prefix}/choice.json"


# -- sampler sweeps: settings of one checkpoint, scored and chosen -------------------------------
def sampler_choice_prefix(run_id: str, stamp: str) -> str:
    """One `diffpipe samplers` sweep (`stamp`: when it ran, as `night_stamp`)."""
    return f"{run_prefix(run_id)}/choices/samplers-{part(stamp, 'choice stamp')}"


def sampler_choice_report(prefix: str) -> str:
    return f"{prefix}/report.md"


def sampler_choice_report_html(prefix: str) -> str:
    return f"{prefix}/report.html"


def sampler_choice_figure(prefix: str) -> str:
    """The metric against NFE, each setting with its spread over the seed ranges."""
    return f"{prefix}/fid.png"


def sampler_choice_record(prefix: str) -> str:
    """The `SamplerChoice` record the report renders."""
    return f"{prefix}/choice.json"


# -- sample sets and their evaluations -----------------------------------------------------------
def sample_set_name(step: int, sampler: str, steps: int, digest: str) -> str:
    """A sample set's folder name; `digest` covers every setting that changes the images."""
    return f"step-{_step(step)}-{part(sampler, 'sampler')}-{steps}-{part(digest, 'digest')}"


def sample_sets_prefix(run_id: str) -> str:
    """The folder of every sample set of the run."""
    return f"{run_prefix(run_id)}/samples"


def sample_set_prefix(run_id: str, set_name: str) -> str:
    return f"{sample_sets_prefix(run_id)}/{part(set_name, 'sample set')}"


def sample_weights(set_prefix: str) -> str:
    return f"{set_prefix}/weights.pt"


def sample_weights_record(set_prefix: str) -> str:
    """Which weights `sample_weights` holds (`SampleWeights`), read instead of the weights."""
    return f"{set_prefix}/weights.json"


def sample_shard(set_prefix: str, n: int) -> str:
    return f"{set_prefix}/shard-{_index(n)}.tar"


def sample_receipt(set_prefix: str, n: int) -> str:
    """Written after its shard: its presence means the shard is complete."""
    return f"{set_prefix}/shard-{_index(n)}.json"


def sample_manifest(set_prefix: str) -> str:
    return f"{set_prefix}/manifest.json"


def sample_features(set_prefix: str, extractor_sha256: str, n: int) -> str:
    """Inception features of shard `n` by the extractor with these weights (KID, IS and a
    re-evaluation read them instead of extracting again)."""
    sha = part(extractor_sha256, "extractor sha256")[:16]
    return f"{set_prefix}/features/{sha}/shard-{_index(n)}.npz"


def evals_prefix(run_id: str) -> str:
    """The folder of every evaluation of the run (one per sample set, named as it)."""
    return f"{run_prefix(run_id)}/eval"


def eval_prefix(run_id: str, set_name: str) -> str:
    return f"{evals_prefix(run_id)}/{part(set_name, 'sample set')}"


def eval_metrics(prefix: str) -> str:
    return f"{prefix}/metrics.json"


def eval_grid(prefix: str) -> str:
    return f"{prefix}/grid.png"


def eval_report(prefix: str) -> str:
    return f"{prefix}/report.md"


# -- nightly reports -----------------------------------------------------------------------------
def night_stamp(when: datetime) -> str:
    """A night's name, `20261125T020000Z`: its scheduled start in UTC (a rerun keeps it)."""
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def nightlies_prefix(run_id: str) -> str:
    """The folder of every night's report of the run (and `nightly_latest`)."""
    return f"{run_prefix(run_id)}/nightly"


def nightly_prefix(run_id: str, stamp: str) -> str:
    return f"{nightlies_prefix(run_id)}/{part(stamp, 'nightly stamp')}"


def nightly_report(prefix: str) -> str:
    return f"{prefix}/report.md"


def nightly_report_html(prefix: str) -> str:
    """The self-contained report (its images inlined)."""
    return f"{prefix}/report.html"


NightlyFigure = Literal["grid", "loss", "fid", "scores"]


def nightly_figure(prefix: str, figure: NightlyFigure) -> str:
    """A figure of the night's report (sample grid, loss curve, FID over nights, scores over
    steps) beside report.md."""
    return f"{prefix}/{part(figure, 'figure')}.png"


def nightly_summary(prefix: str) -> str:
    return f"{prefix}/summary.json"


def nightly_train_target(prefix: str) -> str:
    """The steps the night trains from and to, fixed when it first trains (a rerun keeps them)."""
    return f"{prefix}/train_target.json"


def nightly_latest(run_id: str) -> str:
    return f"{nightlies_prefix(run_id)}/latest.json"


# -- evaluation caches ---------------------------------------------------------------------------
def reference_stats(fingerprint: str, extractor_sha256: str, count: int) -> str:
    sha = part(extractor_sha256, "extractor sha256")[:16]
    return f"{reference_stats_prefix(fingerprint)}/{sha}-n{count}.npz"


def training_features(fingerprint: str, extractor_sha256: str, count: int) -> str:
    """Pool features of the first `count` training images (the memorization check's neighbours);
    beside the reference statistics, not under their prefix's `-n<count>` names."""
    sha = part(extractor_sha256, "extractor sha256")[:16]
    return f"stats-train/{part(fingerprint, 'dataset fingerprint')}/{sha}-n{count}.npz"


def stats_root() -> str:
    """The folder of every dataset's cached reference statistics."""
    return "stats"


def reference_stats_prefix(fingerprint: str) -> str:
    return f"{stats_root()}/{part(fingerprint, 'dataset fingerprint')}"


def extractor(filename: str) -> str:
    return f"extractors/{part(filename, 'extractor weights file')}"


def extractors_prefix() -> str:
    return "extractors"


# -- promoted models -----------------------------------------------------------------------------
def models_root() -> str:
    """The folder of every promoted model."""
    return "models"


def model_prefix(name: str) -> str:
    return f"{models_root()}/{part(name, 'model name')}"


def model_current(name: str) -> str:
    return f"{model_prefix(name)}/current.json"


def model_history(name: str) -> str:
    return f"{model_prefix(name)}/history.json"


def model_checkpoint(name: str, step: int) -> str:
    """The promoted checkpoint's own copy: training prunes its old checkpoints."""
    return f"{model_prefix(name)}/step-{_step(step)}.pt"


def model_champion(name: str, step: int) -> str:
    """The champion record of the copy `model_checkpoint(name, step)`, kept for rollbacks."""
    return f"{model_prefix(name)}/step-{_step(step)}.json"


def is_model_champion(name: str, key: str) -> bool:
    """Whether `key` is a champion record of model `name` (`model_champion(name, step)`)."""
    return re.fullmatch(re.escape(model_prefix(name)) + r"/step-\d+\.json", key) is not None


# -- leases: one writer per run, one promotion of a model at a time ------------------------------
def run_lease_prefix(run_id: str) -> str:
    """The lease folder of a run: the nightly and `diffpipe train` hold it (`tasks.lease`)."""
    return f"{run_prefix(run_id)}/lease"


def model_lease_prefix(name: str) -> str:
    """The lease folder of a promoted model: promotions, rollbacks and repairs hold it."""
    return f"{model_prefix(name)}/lease"


def lease_object(prefix: str) -> str:
    """The lease itself, created only where none exists and replaced only by its holder."""
    return f"{prefix}/lease.json"


def lease_claim(prefix: str, token: str) -> str:
    """One contender's claim, for stores without conditional writes (the compare-and-swap
    fallback of `tasks.lease`)."""
    return f"{prefix}/claim-{part(token, 'lease token')}.json"


def is_lease_claim(prefix: str, key: str) -> bool:
    """Whether `key` is a claim `lease_claim(prefix, token)` built."""
    return re.fullmatch(re.escape(prefix) + r"/claim-[A-Za-z0-9]+\.json", key) is not None


# -- sweeps over training settings: trials are ordinary runs, the sweep's own files here ---------
def sweep_prefix(name: str) -> str:
    """One `diffpipe sweep` (its trials are the runs `<name>-tNN`, under runs/)."""
    return f"sweeps/{part(name, 'sweep name')}"


def sweep_trial(prefix: str, trial_id: str) -> str:
    """A trial's `SweepTrial` record: its settings and each segment's score and cost."""
    return f"{prefix}/trials/{part(trial_id, 'trial id')}.json"


def sweep_spec(prefix: str) -> str:
    """The sweep's YAML as it started, validated: a resumed sweep must be the same sweep."""
    return f"{prefix}/spec.json"


def sweep_record(prefix: str) -> str:
    """The `SweepResult` record the report renders."""
    return f"{prefix}/sweep.json"


def sweep_report(prefix: str) -> str:
    return f"{prefix}/report.md"


def sweep_report_html(prefix: str) -> str:
    return f"{prefix}/report.html"


def sweep_figure(prefix: str) -> str:
    """FID over steps, one line per trial."""
    return f"{prefix}/fid.png"


def sweep_tune_prefix(prefix: str) -> str:
    """Ray Tune's experiment folder (its state, from which a killed sweep resumes)."""
    return f"{prefix}/tune"
