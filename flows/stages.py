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

from tasks.config import (
    DataConfig,
    EvalConfig,
    PipelineConfig,
    PromoteConfig,
    RayConfig,
    SampleConfig,
    StorageConfig,
)
from tasks.evaluate.stage import evaluate
from tasks.promote.stage import promote_if_better
from tasks.records import (
    Checkpoint,
    DatasetManifest,
    Evaluation,
    Metrics,
    MetricSample,
    NightlySummary,
    PromotionDecision,
    SampleSet,
    ShardResult,
    TrainResult,
)
from tasks.report.stage import render_markdown, write_nightly_report
from tasks.retry import STAGE_RETRIES, STAGE_RETRY_DELAY_S, is_transient
from tasks.sample.stage import sample_images
from tasks.shard.stage import shard_dataset
from tasks.storage import open_store
from tasks.train.stage import train

P = ParamSpec("P")
R = TypeVar("R")


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
def train_task(cfg: PipelineConfig, dataset: DatasetManifest, nightly: bool = False) -> TrainResult:
    return train(cfg, open_store(cfg.storage), dataset, nightly=nightly)


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
    evaluation = evaluate(open_store(storage), cfg, ray, dataset, samples)
    m = evaluation.metrics
    create_markdown_artifact(
        evaluation.report_markdown,
        key="evaluation-report",
        description=f"evaluation of {samples.key}",
    )
    rows = [
        {"metric": name, "value": value}
        for name, value in (
            ("fid", m.fid),
            ("fid_std", m.fid_std),
            ("kid_mean", m.kid_mean),
            ("kid_std", m.kid_std),
            ("isc_mean", m.isc_mean),
            ("isc_std", m.isc_std),
        )
        if value is not None
    ]
    create_table_artifact(rows, key="evaluation-metrics", description=m.extractor.label)
    return evaluation


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
            for metric in ("fid", "kid")
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
