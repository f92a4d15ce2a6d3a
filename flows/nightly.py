"""Flows: one per stage, for the CLI and ad-hoc runs, and `nightly`, the scheduled chain
shard (reused when unchanged) -> train (continue the run) -> sample -> evaluate -> promote -> report.

Flows take a config path and `section.field=value` overrides (JSON-able, so a deployment can carry
them), resolve the config once, and pass each stage the sections it uses and the records the
stages before it returned.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.stages import evaluate_task, promote_task, sample_task, shard_task, train_task
from tasks.config import PipelineConfig, load_config
from tasks.records import (
    Checkpoint,
    Evaluation,
    NightlySummary,
    SampleSet,
    ShardResult,
    TrainResult,
)
from tasks.report import write_nightly_report
from tasks.runtime import setup_process
from tasks.sample import find_sample_set
from tasks.storage import open_store


def _load(config_path: str | None, overrides: list[str] | None) -> PipelineConfig:
    setup_process()  # a Prefect worker imports this module itself, without our CLI
    return load_config(config_path, overrides)


def _latest_checkpoint(cfg: PipelineConfig) -> Checkpoint:
    return Checkpoint.require_latest(open_store(cfg.storage), cfg.train.run_id)


@flow(name="shard")
def shard_flow(config_path: str | None = None, overrides: list[str] | None = None) -> ShardResult:
    cfg = _load(config_path, overrides)
    return shard_task(cfg.data, cfg.storage, cfg.ray)


@flow(name="train")
def train_flow(config_path: str | None = None, overrides: list[str] | None = None) -> TrainResult:
    cfg = _load(config_path, overrides)
    return train_task(cfg, shard_task(cfg.data, cfg.storage, cfg.ray).manifest)


@flow(name="sample")
def sample_flow(config_path: str | None = None, overrides: list[str] | None = None) -> SampleSet:
    cfg = _load(config_path, overrides)
    return sample_task(cfg.sample, cfg.ray, cfg.storage, _latest_checkpoint(cfg))


@flow(name="evaluate")
def evaluate_flow(config_path: str | None = None, overrides: list[str] | None = None) -> Evaluation:
    cfg = _load(config_path, overrides)
    checkpoint = _latest_checkpoint(cfg)
    samples = find_sample_set(open_store(cfg.storage), checkpoint, cfg.sample)
    if samples is None:
        raise FileNotFoundError(
            f"run {cfg.train.run_id!r} has no complete sample set for step {checkpoint.step} with "
            "these sample.* settings; run `diffpipe sample` with the same settings first"
        )
    dataset = shard_task(cfg.data, cfg.storage, cfg.ray).manifest
    return evaluate_task(cfg.evaluate, cfg.ray, cfg.storage, dataset, samples)


@flow(name="nightly")
def nightly(config_path: str | None = None, overrides: list[str] | None = None) -> NightlySummary:
    """Retrain, sample, evaluate; promote only when better. Returns the summary (report URL, FID, decision)."""
    logger = get_run_logger()
    cfg = _load(config_path, overrides)
    logger.info("storage %s, run %s", cfg.storage.root, cfg.train.run_id)
    sharded = shard_task(cfg.data, cfg.storage, cfg.ray)
    trained = train_task(cfg, sharded.manifest, nightly=True)
    samples = sample_task(cfg.sample, cfg.ray, cfg.storage, trained.checkpoint)
    evaluation = evaluate_task(cfg.evaluate, cfg.ray, cfg.storage, sharded.manifest, samples)
    decision = promote_task(cfg.promote, cfg.storage, evaluation.metrics, trained.checkpoint)
    summary = write_nightly_report(
        open_store(cfg.storage), sharded, trained, samples, evaluation, decision
    )
    logger.info("report: %s", summary.report_url)
    return summary
