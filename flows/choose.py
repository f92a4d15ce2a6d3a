"""Flows that choose a setting by evaluation.

`sampler_flow` (`diffpipe samplers`): a grid of sampler settings (sampler x steps x spacing x
guidance) of the run's latest checkpoint, sampled as one job on one actor pool and scored on one
feature pool, on the same seed ranges; the report shows FID against NFE and keeps the cheapest
setting within the noise of the best.

`ema_flow` (`diffpipe ema`): EMAs of several widths rebuilt after training from the run's
power-EMA snapshots (EDM2's post-hoc EMA), each sampled and scored on the same seed ranges; the
report keeps the width with the lowest mean FID and lists those within its noise.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.stages import (
    ema_report_task,
    evaluate_sets_task,
    load_flow_config,
    rebuild_ema_task,
    sample_grid_task,
    sample_task,
    sampler_report_task,
    shard_task,
)
from tasks import layout
from tasks.config import EMA_CHOICE_SIGMA_RELS, PipelineConfig
from tasks.records import Checkpoint, EmaChoice, SamplerChoice
from tasks.sample.grid import grid_configs, sampler_choice, use_command
from tasks.storage import open_store
from tasks.train.phema import choose_ema_length


def _require_fid(cfg: PipelineConfig, what: str) -> None:
    """A choice is made on FID: refuse a config that does not compute it, naming the field."""
    if "fid" not in cfg.evaluate.metrics:
        raise ValueError(
            f"{what} scores FID, but evaluate.metrics is {list(cfg.evaluate.metrics)}: add fid"
        )


@flow(name="samplers")
def sampler_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    grid: list[dict[str, Any]] | None = None,
    stamp: str | None = None,
) -> SamplerChoice:
    """Sample and score every setting of `grid` (each a dict of sample fields over the config's
    `sample` section, e.g. {"sampler": "dpmpp_2m", "steps": 20}; default: the configured setting
    alone) with `evaluate.repeats` seed ranges each; choose the cheapest (fewest network
    evaluations per image) that a paired test at `promote.alpha` cannot call worse than the best.

    `stamp` names the sweep's report folder (default: this flow run's scheduled start, so a
    retried run keeps it). Returns the choice, every setting's score included."""
    logger = get_run_logger()
    cfg = load_flow_config(config_path, overrides)
    _require_fid(cfg, "the sampler sweep")
    store = open_store(cfg.storage)
    checkpoint = Checkpoint.require_latest(store, cfg.train.run_id)
    configs = grid_configs(
        cfg.sample,
        grid or [{}],
        num_timesteps=checkpoint.model.num_timesteps,
        conditional=checkpoint.unet.num_classes is not None,
    )
    stamp = stamp or layout.night_stamp(flow_run.scheduled_start_time)
    logger.info(
        "sampler sweep of run %s, step %d: %d settings x %d seed ranges of %d images",
        checkpoint.run_id,
        checkpoint.step,
        len(configs),
        cfg.evaluate.repeats,
        cfg.sample.num_images,
    )
    sampled = sample_grid_task(configs, cfg.ray, cfg.storage, checkpoint, cfg.evaluate.repeats)
    if sampled.weight_loads:
        logger.info(
            "sampled on %d actor(s), weights loaded %s time(s) each",
            len(sampled.weight_loads),
            "/".join(map(str, sampled.weight_loads)),
        )
    dataset = shard_task(cfg.data, cfg.storage, cfg.ray).manifest
    evaluations = evaluate_sets_task(cfg.evaluate, cfg.ray, cfg.storage, dataset, sampled.sets)
    prefix = layout.sampler_choice_prefix(checkpoint.run_id, stamp)
    html_key = layout.sampler_choice_report_html(prefix)
    choice = sampler_choice(
        sampled.sets,
        [e.metrics for e in evaluations],
        metric="fid",
        alpha=cfg.promote.alpha,
        command={s.name: use_command(config_path, overrides or [], s.config) for s in sampled.sets},
        stamp=stamp,
        report_keys=(layout.sampler_choice_report(prefix), html_key),
        report_url=store.url(html_key),
    )
    sampler_report_task(cfg.storage, choice)
    logger.info(
        "chosen: %s (%d NFE); report %s", choice.chosen.name, choice.chosen.nfe, choice.report_url
    )
    return choice


@flow(name="ema")
def ema_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    sigma_rels: list[float] | None = None,
    step: int | None = None,
    stamp: str | None = None,
) -> EmaChoice:
    """Rebuild the EMA of each width in `sigma_rels` (default: `EMA_CHOICE_SIGMA_RELS`) at `step`
    (default: the newest snapshot's) from the run's power-EMA snapshots, sample and score each on
    the same `evaluate.repeats` seed ranges, and choose the lowest mean FID; a paired test at
    `promote.alpha` names the widths within its noise.

    `stamp` names the report folder (default: this flow run's scheduled start). Returns the
    choice, every width's score included."""
    logger = get_run_logger()
    cfg = load_flow_config(config_path, overrides)
    _require_fid(cfg, "the EMA choice")
    if not cfg.sample.use_ema:
        raise ValueError(
            "the EMA choice samples the rebuilt EMA weights, but sample.use_ema is false: "
            "drop that override"
        )
    stamp = stamp or layout.night_stamp(flow_run.scheduled_start_time)
    targets = list(sigma_rels or EMA_CHOICE_SIGMA_RELS)
    rebuilt = rebuild_ema_task(cfg.storage, cfg.train.run_id, targets, step)
    logger.info(
        "post-hoc EMA of run %s at step %d: %d widths from %d snapshot steps of sigma_rel %s",
        rebuilt.run_id,
        rebuilt.step,
        len(targets),
        len(rebuilt.snapshot_steps),
        ", ".join(f"{s:g}" for s in rebuilt.snapshot_sigma_rels),
    )
    sets = [
        sample_task(cfg.sample, cfg.ray, cfg.storage, checkpoint, cfg.evaluate.repeats)
        for checkpoint in rebuilt.checkpoints
    ]
    dataset = shard_task(cfg.data, cfg.storage, cfg.ray).manifest
    evaluations = evaluate_sets_task(cfg.evaluate, cfg.ray, cfg.storage, dataset, sets)
    html_key = layout.ema_choice_report_html(layout.ema_choice_prefix(rebuilt.run_id, stamp))
    choice = choose_ema_length(
        rebuilt,
        [e.metrics for e in evaluations],
        cfg.promote.alpha,
        stamp,
        report_url=open_store(cfg.storage).url(html_key),
    )
    ema_report_task(cfg.storage, choice)
    logger.info("chosen: sigma_rel %g; report %s", choice.chosen, choice.report_url)
    return choice
