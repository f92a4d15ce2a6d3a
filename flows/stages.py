"""The stages as Prefect tasks: thin wrappers that add retries, logging and artifacts.

Each takes the config sections it uses. A stage is re-run only when its failure was transient
(`tasks.retry`: the store's own retries ran out); a deterministic failure fails at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE

from flows.scoring import CheckpointScorer
from tasks.config import (
    DataConfig,
    EvalConfig,
    PipelineConfig,
    PromoteConfig,
    RayConfig,
    RetentionConfig,
    SampleConfig,
    StorageConfig,
    TrainConfig,
    load_config,
)
from tasks.evaluate.stage import evaluate, evaluate_sets
from tasks.promote.stage import promote_if_better
from tasks.records import (
    METRICS,
    Checkpoint,
    DatasetManifest,
    EmaChoice,
    Evaluation,
    Metrics,
    MetricSample,
    NightlySummary,
    PromotionDecision,
    RebuiltEma,
    SamplerChoice,
    SampleSet,
    ShardResult,
    TrainResult,
)
from tasks.report.choice import write_ema_report, write_sampler_report
from tasks.report.document import render_markdown
from tasks.report.stage import write_evaluation_report, write_nightly_report
from tasks.retention.stage import apply_retention, plan_retention
from tasks.retry import STAGE_RETRIES, STAGE_RETRY_DELAY_S, is_transient
from tasks.runtime import setup_process
from tasks.sample.stage import SampleGrid, sample_grid, sample_images
from tasks.shard.stage import shard_dataset
from tasks.storage import open_store
from tasks.train.phema import rebuild_ema
from tasks.train.stage import train

P = ParamSpec("P")
R = TypeVar("R")


def load_flow_config(config_path: str | None, overrides: list[str] | None) -> PipelineConfig:
    """A flow's config, resolved once. A Prefect worker imports the flows itself, without our CLI,
    so the process settings are made here too."""
    setup_process()
    return load_config(config_path, overrides)


def _transient_failure(task: Any, task_run: Any, state: Any) -> bool:  # Prefect's hook signature
    try:
        state.result()
    except BaseException as err:  # noqa: BLE001 - the state's error, classified below
        return is_transient(err)
    return False


def _stage(name: str) -> Callable[[Callable[P, R]], Task[P, R]]:
    return task(
        name=name,
        retries=STAGE_RETRIES,
        retry_delay_seconds=STAGE_RETRY_DELAY_S,
        retry_condition_fn=_transient_failure,
        cache_policy=NONE,
    )


@_stage("shard")
def shard_task(data: DataConfig, storage: StorageConfig, ray: RayConfig) -> ShardResult:
    return shard_dataset(data, open_store(storage), ray)


@_stage("train")
def train_task(
    cfg: PipelineConfig, dataset: DatasetManifest, nightly: bool = False, night: str | None = None
) -> TrainResult:
    """Train; with `evaluate.score_every`, score checkpoints while training runs (the result then
    names the best of them)."""
    store = open_store(cfg.storage)
    if not cfg.evaluate.score_every:
        return train(cfg, store, dataset, nightly=nightly, night=night)
    with CheckpointScorer(cfg, dataset) as scorer:
        return scorer.finish(
            train(cfg, store, dataset, nightly=nightly, night=night, on_checkpoint=scorer.submit)
        )


@_stage("sample")
def sample_task(
    sample: SampleConfig,
    ray: RayConfig,
    storage: StorageConfig,
    checkpoint: Checkpoint,
    repeats: int = 1,
) -> SampleSet:
    return sample_images(open_store(storage), sample, ray, checkpoint, repeats=repeats)


@_stage("evaluate")
def evaluate_task(
    cfg: EvalConfig,
    ray: RayConfig,
    storage: StorageConfig,
    dataset: DatasetManifest,
    samples: SampleSet,
) -> Evaluation:
    """Score the samples, then render what was scored (grid.png, report.md beside metrics.json)."""
    store = open_store(storage)
    m = evaluate(store, cfg, ray, dataset, samples)
    evaluation = Evaluation(
        metrics=m, report_markdown=write_evaluation_report(store, m, samples, cfg.grid_images)
    )
    create_markdown_artifact(
        evaluation.report_markdown,
        key="evaluation-report",
        description=f"evaluation of {samples.key}",
    )
    rows = [{"metric": name, "value": value} for name, value in m.scores().items()]
    create_table_artifact(rows, key="evaluation-metrics", description=m.extractor.label)
    return evaluation


@_stage("sample-grid")
def sample_grid_task(
    configs: list[SampleConfig],
    ray: RayConfig,
    storage: StorageConfig,
    checkpoint: Checkpoint,
    repeats: int = 1,
) -> SampleGrid:
    """One sample set per setting, as one job on one actor pool (one weights load per actor)."""
    return sample_grid(open_store(storage), configs, ray, checkpoint, repeats=repeats)


@_stage("evaluate-sets")
def evaluate_sets_task(
    cfg: EvalConfig,
    ray: RayConfig,
    storage: StorageConfig,
    dataset: DatasetManifest,
    sets: list[SampleSet],
) -> list[Evaluation]:
    """Score every set on one feature pool (the reference statistics computed once), then render
    each (grid.png, report.md beside its metrics.json)."""
    store = open_store(storage)
    return [
        Evaluation(
            metrics=m,
            report_markdown=write_evaluation_report(store, m, samples, cfg.grid_images),
        )
        for samples, m in zip(sets, evaluate_sets(store, cfg, ray, dataset, sets), strict=True)
    ]


@_stage("sampler-report")
def sampler_report_task(storage: StorageConfig, choice: SamplerChoice) -> SamplerChoice:
    """Write the sweep's report; publish it as Prefect artifacts (its Markdown, the settings'
    table, a link to report.html)."""
    document = write_sampler_report(open_store(storage), choice)
    create_markdown_artifact(
        render_markdown(document, images=False)
        + f"\n\nThe full report, its figure included: {choice.report_url}\n",
        key="sampler-choice",
        description=f"run {choice.run_id}, step {choice.step}, sweep {choice.stamp}",
    )
    create_table_artifact(
        [
            {
                "setting": s.name,
                "nfe": s.nfe,
                choice.metric: s.mean,
                "std": s.std,
                "per_range": s.values,
                "within_noise": s.within_noise,
                "chosen": s.chosen,
            }
            for s in choice.settings
        ],
        key="sampler-settings",
        description=f"{choice.extractor}; {choice.repeats} seed ranges of {choice.num_images}",
    )
    create_link_artifact(choice.report_url, link_text="the sweep's report", key="sampler-report")
    return choice


@_stage("rebuild-ema")
def rebuild_ema_task(
    storage: StorageConfig, run_id: str, sigma_rels: list[float], step: int | None = None
) -> RebuiltEma:
    """The EMA of each width at `step` (default: the newest snapshot's), from the run's
    power-EMA snapshots: one checkpoint each."""
    return rebuild_ema(open_store(storage), run_id, sigma_rels, step)


@_stage("ema-report")
def ema_report_task(storage: StorageConfig, choice: EmaChoice) -> EmaChoice:
    """Write the EMA-length choice's report; publish it as Prefect artifacts (its Markdown, the
    lengths' table)."""
    document = write_ema_report(open_store(storage), choice)
    create_markdown_artifact(
        render_markdown(document, images=False) + f"\n\nThe report: {choice.report_url}\n",
        key="ema-choice",
        description=f"run {choice.run_id}, step {choice.step}, choice {choice.stamp}",
    )
    create_table_artifact(
        [
            {
                "sigma_rel": c.sigma_rel,
                "fid": c.fid,
                "std": c.fid_std,
                "per_range": c.fids,
                "within_noise": c.within_noise,
                "chosen": c.sigma_rel == choice.chosen,
            }
            for c in choice.candidates
        ],
        key="ema-lengths",
        description=f"{choice.extractor.label}; {choice.repeats} seed ranges of {choice.num_images}",
    )
    return choice


@_stage("promote")
def promote_task(
    cfg: PromoteConfig,
    storage: StorageConfig,
    metrics: Metrics,
    checkpoint: Checkpoint,
    night: str,
) -> PromotionDecision:
    return promote_if_better(open_store(storage), cfg, metrics, checkpoint, night)


@_stage("report")
def report_task(storage: StorageConfig, summary: NightlySummary) -> NightlySummary:
    """Write the night's report; publish it as Prefect artifacts (the report's Markdown, its
    metrics with their noise, the stages' times, a link to report.html)."""
    report = write_nightly_report(open_store(storage), summary)
    create_markdown_artifact(
        render_markdown(report, images=False)
        + f"\n\nThe full report, images included: {summary.report_url}\n",
        key="nightly-report",
        description=f"run {summary.run_id}, night {summary.stamp}",
    )
    m = summary.metrics
    create_table_artifact(
        [
            {"metric": metric, "mean": s.mean, "std": s.std, "k": s.k, "per_repeat": s.values}
            for metric in METRICS
            if (s := MetricSample.of(m, metric)) is not None
        ],
        key="nightly-metrics",
        description=f"{m.extractor.label}; std over {m.repeats} repeat(s) of {m.num_images} images",
    )
    create_table_artifact(
        [
            {
                "stage": t.name,
                "seconds": round(t.seconds, 1),
                "reused": t.reused,
                "result": t.detail,
            }
            for t in summary.stages
        ],
        key="nightly-stages",
        description=f"run {summary.run_id}, night {summary.stamp}",
    )
    create_link_artifact(summary.report_url, link_text="the full report", key="nightly-report-html")
    return summary


@_stage("retention")
def retention_task(policy: RetentionConfig, train: TrainConfig, storage: StorageConfig) -> str:
    """The nightly's last stage: the store's retention policy applied (`tasks/retention/`); the
    stage line's detail says what it freed."""
    if not policy.enabled:
        return "off (retention.enabled=false): nothing deleted"
    store = open_store(storage)
    planned = plan_retention(store, policy, train.keep_checkpoints)
    apply_retention(store, planned, policy)
    pruned = len(planned.pruned_reports)
    reports = f"; {pruned} older report(s) now say their images were pruned" if pruned else ""
    return planned.describe() + reports
