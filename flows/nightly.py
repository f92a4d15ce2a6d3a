"""Flows: one per stage, for the CLI and ad-hoc runs, and `nightly`, the scheduled chain
shard (reused when unchanged) -> train (continue the run) -> sample -> evaluate -> promote -> report.

Flows take a config path and `section.field=value` overrides (JSON-able, so a deployment can carry them).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.stages import evaluate_task, promote_task, sample_task, shard_task, train_task
from tasks.config import load_config
from tasks.report import write_nightly_report
from tasks.storage import Store
from tasks.train_loop import read_latest


@flow(name="shard")
def shard_flow(
    config_path: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    return shard_task(load_config(config_path, overrides))


@flow(name="train")
def train_flow(
    config_path: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    cfg = load_config(config_path, overrides)
    return train_task(cfg, shard_task(cfg))


def _latest_checkpoint(cfg: Any) -> str:
    latest = read_latest(Store(cfg.storage), cfg.train.run_id)
    if latest is None:
        raise FileNotFoundError(
            f"run {cfg.train.run_id!r} has no checkpoint yet; run `diffpipe train` first"
        )
    return latest["key"]


@flow(name="sample")
def sample_flow(
    config_path: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    cfg = load_config(config_path, overrides)
    return sample_task(cfg, _latest_checkpoint(cfg))


@flow(name="evaluate")
def evaluate_flow(
    config_path: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    cfg = load_config(config_path, overrides)
    manifest = shard_task(cfg)
    samples = sample_task(cfg, _latest_checkpoint(cfg))  # reused when that sample set is complete
    return evaluate_task(cfg, manifest, samples)


@flow(name="nightly")
def nightly(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Retrain, sample, evaluate; promote only when better. Returns the summary (report URL, FID, decision)."""
    logger = get_run_logger()
    cfg = load_config(config_path, overrides)
    store = Store(cfg.storage)
    logger.info("storage %s, run %s", store.config.root, cfg.train.run_id)
    manifest = shard_task(cfg)
    trained = train_task(cfg, manifest, nightly=True)
    samples = sample_task(cfg, trained["checkpoint_key"])
    metrics = evaluate_task(cfg, manifest, samples)
    decision = promote_task(cfg, metrics, trained["checkpoint_key"])
    evaluation_md = store.read_bytes(metrics["report_key"]).decode()
    summary = {
        "run_id": cfg.train.run_id,
        "dataset": manifest["dataset"],
        "manifest_key": manifest["manifest_key"],
        "shards_reused": manifest["reused"],
        "step": trained["step"],
        "resumed_from": trained["resumed_from"],
        "trained_steps": trained["trained_steps"],
        "checkpoint_key": trained["checkpoint_key"],
        "samples_key": samples["manifest_key"],
        "metrics": metrics,
        "promotion": decision,
    }
    summary = write_nightly_report(store, cfg.train.run_id, summary, evaluation_md)
    logger.info("report: %s", summary["report_url"])
    return summary
