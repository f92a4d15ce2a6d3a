"""Flows: one per stage, for the CLI and ad-hoc runs, and `nightly`, the scheduled chain
shard (reused when unchanged) -> train (continue the run) -> sample -> evaluate -> promote -> report
-> retention (what the store no longer keeps is deleted).

Flows take a config path and `section.field=value` overrides (JSON-able, so a deployment can carry
them), resolve the config once, and pass each stage the sections it uses and the records the
stages before it returned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, datetime
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from flows.stages import (
    evaluate_task,
    load_flow_config,
    promote_task,
    report_task,
    retention_task,
    sample_task,
    shard_task,
    train_task,
)
from tasks import layout
from tasks.config import PipelineConfig
from tasks.lease import Lease, interrupted_nights, model_lease, run_lease
from tasks.promote.stage import read_champion
from tasks.records import (
    Checkpoint,
    Evaluation,
    MetricSample,
    NightlySummary,
    SampleSet,
    ShardResult,
    StageTiming,
    TrainResult,
)
from tasks.report.stage import nightly_summary
from tasks.sample.stage import find_sample_set
from tasks.storage import open_store
from tasks.usage import StageMeter


def _latest_checkpoint(cfg: PipelineConfig) -> Checkpoint:
    return Checkpoint.require_latest(open_store(cfg.storage), cfg.train.run_id)


@flow(name="shard")
def shard_flow(config_path: str | None = None, overrides: list[str] | None = None) -> ShardResult:
    cfg = load_flow_config(config_path, overrides)
    return shard_task(cfg.data, cfg.storage, cfg.ray)


def _run_lease(
    cfg: PipelineConfig, command: str, wait: bool, night: str | None = None
) -> contextlib.AbstractContextManager[Lease]:
    """The run's lease for this flow run: one writer of the run at a time (`tasks.lease`)."""
    store = open_store(cfg.storage)
    return run_lease(
        store,
        cfg.train.run_id,
        cfg.lease,
        command=command,
        wait=wait,
        flow_run=flow_run.id,
        night=night,
    )


@flow(name="train")
def train_flow(
    config_path: str | None = None, overrides: list[str] | None = None, wait_for_lease: bool = False
) -> TrainResult:
    cfg = load_flow_config(config_path, overrides)
    with _run_lease(cfg, "train", wait_for_lease):
        return train_task(cfg, shard_task(cfg.data, cfg.storage, cfg.ray).manifest)


@flow(name="sample")
def sample_flow(config_path: str | None = None, overrides: list[str] | None = None) -> SampleSet:
    cfg = load_flow_config(config_path, overrides)
    return sample_task(
        cfg.sample, cfg.ray, cfg.storage, _latest_checkpoint(cfg), cfg.evaluate.repeats
    )


@flow(name="evaluate")
def evaluate_flow(config_path: str | None = None, overrides: list[str] | None = None) -> Evaluation:
    cfg = load_flow_config(config_path, overrides)
    checkpoint = _latest_checkpoint(cfg)
    samples = find_sample_set(open_store(cfg.storage), checkpoint, cfg.sample, cfg.evaluate.repeats)
    if samples is None:
        raise FileNotFoundError(
            f"run {cfg.train.run_id!r} has no complete sample set for step {checkpoint.step} with "
            "these sample.* settings; run `diffpipe sample` with the same settings first"
        )
    dataset = shard_task(cfg.data, cfg.storage, cfg.ray).manifest
    return evaluate_task(cfg.evaluate, cfg.ray, cfg.storage, dataset, samples)


class _Stages:
    """The nightly's stages as the console and the Prefect UI see them: a line when each starts
    and ends, its wall time kept for the report, and a progress artifact at the share done."""

    NAMES = ("shard", "train", "sample", "evaluate", "promote", "report", "retention")

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[logging.Logger], run: str):
        self.logger, self.run = logger, run
        self.timings: list[StageTiming] = []
        self.started = time.perf_counter()
        self.started_at = datetime.now(UTC)
        progress = create_progress_artifact(
            0.0, key="nightly-progress", description=f"nightly {run}: starting"
        )
        assert isinstance(progress, UUID)  # called from sync code: the sync variant ran
        self.progress = progress

    def start(self, name: str) -> None:
        self.started, self.started_at = time.perf_counter(), datetime.now(UTC)
        self.meter = StageMeter()  # device time, bytes and store requests (`tasks.usage`)
        self.logger.info("[%d/%d] %s ...", self.NAMES.index(name) + 1, len(self.NAMES), name)

    def done(self, name: str, detail: str, reused: bool | None = None) -> StageTiming:
        timing = StageTiming(
            name=name,
            seconds=time.perf_counter() - self.started,
            reused=reused,
            detail=detail,
            usage=self.meter.stop(),
        )
        self.timings.append(timing)
        n = self.NAMES.index(name) + 1
        self.logger.info(
            "[%d/%d] %s done in %.1f s%s: %s",
            n,
            len(self.NAMES),
            name,
            timing.seconds,
            " (reused)" if reused else "",
            detail,
        )
        assert timing.usage is not None
        self.logger.info("[%d/%d] %s used %s", n, len(self.NAMES), name, timing.usage.describe())
        update_progress_artifact(
            self.progress,
            100.0 * n / len(self.NAMES),
            description=f"nightly {self.run}: {name} done ({n}/{len(self.NAMES)})",
        )
        return timing

    def made_before_start(self, created: str) -> bool:
        """Whether a record stamped `created` existed before the current stage began (reused)."""
        return datetime.fromisoformat(created) < self.started_at.replace(microsecond=0)


@flow(name="nightly")
def nightly(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    night: str | None = None,
    wait_for_lease: bool = False,
) -> NightlySummary:
    """Retrain, sample, evaluate; promote only when better by more than the noise; report.

    `night` names the night (default: the night of a nightly of the run killed before it ended,
    so that a rerun completes it; else this flow run's scheduled start, `20261125T020000Z`, so a
    retried run keeps it): its report folder, and its one decision in the promotion history,
    which a rerun of the night replaces. Returns the summary (report URL, FID, decision, stages).
    The run's lease is held throughout: another writer of the run fails at once, or is waited
    for with `wait_for_lease` (`diffpipe nightly --wait`)."""
    logger = get_run_logger()
    cfg = load_flow_config(config_path, overrides)
    interrupted = interrupted_nights(open_store(cfg.storage), cfg.train.run_id)
    night = night or max(interrupted, default=layout.night_stamp(flow_run.scheduled_start_time))
    with _run_lease(cfg, "nightly", wait_for_lease, night):
        return _night(cfg, night, logger)


def _night(
    cfg: PipelineConfig,
    night: str,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> NightlySummary:
    """The nightly's stages, under the run's lease."""
    logger.info("storage %s, run %s, night %s", cfg.storage.root, cfg.train.run_id, night)
    # The last stage reads the champion: a damaged pointer is refused before any work.
    read_champion(open_store(cfg.storage), cfg.promote.model_name)
    stages = _Stages(logger, cfg.train.run_id)

    stages.start("shard")
    sharded = shard_task(cfg.data, cfg.storage, cfg.ray)
    manifest = sharded.manifest
    stages.done(
        "shard",
        f"{manifest.dataset}: {manifest.split('train').count} train / "
        f"{manifest.split('holdout').count} held-out images",
        reused=sharded.reused,
    )

    stages.start("train")
    trained = train_task(cfg, manifest, nightly=True, night=night)
    # The challenger: the best checkpoint scored while training ran, else the last.
    ckpt = trained.best or trained.checkpoint
    if trained.trained_steps == 0:
        stages.done("train", f"nothing to train: the run is at step {ckpt.step}", reused=True)
    else:
        loss = "" if trained.loss is None else f", loss {trained.loss:.4g}"
        best = ""
        if trained.best is not None:
            s = next(s for s in trained.scores if s.step == ckpt.step)
            best = (
                f"; best of {len(trained.scores)} scored: step {ckpt.step}, "
                f"{s.metric.upper()} {s.describe()}"
            )
        stages.done(
            "train",
            f"step {trained.resumed_from or 0} -> {trained.checkpoint.step} "
            f"({trained.trained_steps} steps{loss}){best}",
            reused=False,
        )

    stages.start("sample")
    samples = sample_task(cfg.sample, cfg.ray, cfg.storage, ckpt, cfg.evaluate.repeats)
    stages.done(
        "sample",
        f"{samples.repeats} x {samples.num_images} images, {samples.config.sampler} "
        f"{samples.config.steps} steps",
        reused=stages.made_before_start(samples.created),
    )

    stages.start("evaluate")
    evaluation = evaluate_task(cfg.evaluate, cfg.ray, cfg.storage, manifest, samples)
    m = evaluation.metrics
    score = MetricSample.of(m, cfg.promote.metric)
    stages.done(
        "evaluate",
        f"{cfg.promote.metric.upper()} {score.describe() if score else 'n/a'}, "
        f"{m.repeats} x {m.num_images} images vs {m.num_reference_images} held-out",
    )

    stages.start("promote")
    with model_lease(
        open_store(cfg.storage),
        cfg.promote.model_name,
        cfg.lease,
        command="nightly",
        wait=True,
        flow_run=flow_run.id,
    ):  # one promotion of the model at a time, whichever run
        decision = promote_task(cfg.promote, cfg.storage, m, ckpt, night)
    stages.done("promote", "PROMOTED" if decision.promoted else "the champion stays")

    stages.start("report")
    store = open_store(cfg.storage)
    summary = nightly_summary(
        store, night, sharded, trained, samples, m, decision, list(stages.timings), cfg.prices
    )
    report_task(cfg.storage, summary)
    stages.done("report", summary.report_url)

    # Last, under the run's lease, so that the night just reported is one of those kept.
    stages.start("retention")
    stages.done("retention", retention_task(cfg.retention, cfg.train, cfg.storage))
    return summary
