"""The stages as Prefect tasks: thin wrappers that add retries, logging and artifacts.

Only transient I/O is retried; a deterministic failure (bad config, missing data) fails at once.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from tasks.config import PipelineConfig
from tasks.evaluate_ray import evaluate
from tasks.promote import promote_if_better
from tasks.sample import sample_images
from tasks.shard import shard_dataset
from tasks.storage import Store
from tasks.train import train


def _transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return False
    except (ConnectionError, TimeoutError, OSError):
        return True
    except BaseException:
        return False
    return False


_RETRY = {
    "retries": 2,
    "retry_delay_seconds": 10,
    "retry_condition_fn": _transient_failure,
    "cache_policy": NONE,
}


@task(name="shard", **_RETRY)
def shard_task(cfg: PipelineConfig) -> dict[str, Any]:
    return shard_dataset(cfg.data, Store(cfg.storage))


@task(name="train", **_RETRY)
def train_task(
    cfg: PipelineConfig, manifest: dict[str, Any], nightly: bool = False
) -> dict[str, Any]:
    return train(cfg, manifest, nightly=nightly)


@task(name="sample", **_RETRY)
def sample_task(cfg: PipelineConfig, checkpoint_key: str) -> dict[str, Any]:
    return sample_images(cfg, checkpoint_key)


def eval_prefix(samples: dict[str, Any]) -> str:
    """runs/<id>/samples/<set>/manifest.json -> runs/<id>/eval/<set>"""
    set_prefix = samples["manifest_key"].rsplit("/", 1)[0]
    return set_prefix.replace("/samples/", "/eval/", 1)


@task(name="evaluate", **_RETRY)
def evaluate_task(
    cfg: PipelineConfig, manifest: dict[str, Any], samples: dict[str, Any]
) -> dict[str, Any]:
    store = Store(cfg.storage)
    metrics = evaluate(cfg, manifest, samples["manifest_key"], eval_prefix(samples))
    create_markdown_artifact(
        store.read_bytes(metrics["report_key"]).decode(),
        key="evaluation-report",
        description=f"evaluation of {samples['manifest_key']}",
    )
    rows = [
        {"metric": k, "value": metrics[k]}
        for k in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std")
        if k in metrics
    ]
    create_table_artifact(rows, key="evaluation-metrics", description=metrics["extractor"]["label"])
    return metrics


@task(name="promote", **_RETRY)
def promote_task(
    cfg: PipelineConfig, metrics: dict[str, Any], checkpoint_key: str
) -> dict[str, Any]:
    return promote_if_better(Store(cfg.storage), cfg.promote, metrics, checkpoint_key)
