"""Sweep stage: Ray Tune runs each trial (an ordinary training run, `<sweep>-tNN`) in segments.

A trial trains to its next segment's step (the train stage, whose exact resume from the store
continues the run), scores that checkpoint small on the seed ranges of `evaluate.score_*` (the
sample and evaluate stages, as scoring-while-training does), records the segment in
`sweeps/<name>/trials/<trial>.json`, and reports {fid, fid_std, step, device_s} to Tune, whose
scheduler (ASHA or the median rule, on `step`) ends the losers between segments.

A stage imports no other stage (tests/unit/test_layering.py): the caller (flows/sweep.py) hands
the three stages in as `TrialStages`, plain references to `tasks.*` functions that Ray pickles by
name and its workers import from `tasks/` (shipped to a cluster; flows/ is not).

Survives: a killed driver is resumed by `Tuner.restore` from Tune's experiment folder
(`sweeps/<name>/tune`): finished trials are kept; an unfinished trial starts again and skips the
segments its record holds (its Tune checkpoint says which it already reported). A failed trial
is restarted by Tune (`trial_max_failures`) and resumes the same way; a lost training worker is
the train stage's own business (`train.max_failures`, exact resume).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tasks import layout
from tasks.config import PipelineConfig
from tasks.ray_runtime import ensure_ray, on_driver_node
from tasks.records import (
    DatasetManifest,
    Metrics,
    MetricSample,
    SampleSet,
    SegmentScore,
    SweepStatus,
    SweepTrial,
    TrainResult,
    TrialOutcome,
)
from tasks.storage import Store, open_store
from tasks.sweep.budget import Budget, segment_cost, train_devices
from tasks.sweep.spec import SweepSpec, TrialPlan, max_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialStages:
    """The stages a trial composes: `tasks.train.stage.train`, `tasks.sample.stage.sample_images`
    and `tasks.evaluate.stage.evaluate` (or stand-ins of the same signatures)."""

    train: Callable[..., TrainResult]
    sample: Callable[..., SampleSet]
    evaluate: Callable[..., Metrics]


@dataclass(frozen=True)
class SweepRun:
    """What the Tune run left: each trial's record and how it ended; the budget's ledger."""

    outcomes: list[TrialOutcome]
    spent_device_s: float
    refused: tuple[str, int, float] | None  # the first segment the budget refused


def trial_key(sweep: str, trial_id: str) -> str:
    return layout.sweep_trial(layout.sweep_prefix(sweep), trial_id)


def _new_record(sweep: str, plan: TrialPlan) -> SweepTrial:
    return SweepTrial(
        sweep=sweep,
        trial_id=plan.trial_id,
        run_id=plan.run_id,
        settings=plan.settings,
        seed=plan.seed,
        config_id=plan.config_id,
        target_step=plan.config.train.steps,
    )


def score_segment(
    stages: TrialStages,
    cfg: PipelineConfig,
    dataset: DatasetManifest,
    step: int,
) -> SegmentScore:
    """Train `cfg.train.run_id` to `step` (resuming it), then score that checkpoint on
    `evaluate.score_repeats` seed ranges of `evaluate.score_images` from `score_seed_start`, on
    one sampling and one feature worker."""
    e = cfg.evaluate
    store = open_store(cfg.storage)
    started = time.monotonic()
    trained = stages.train(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": step})}),
        store,
        dataset,
    )
    scoring = time.monotonic()
    sample_cfg = cfg.sample.model_copy(
        update={"num_images": e.score_images, "seed_start": e.score_seed_start, "workers": 1}
    )
    eval_cfg = e.model_copy(update={"repeats": e.score_repeats, "workers": 1, "metrics": ("fid",)})
    samples = stages.sample(store, sample_cfg, cfg.ray, trained.checkpoint, repeats=e.score_repeats)
    m = stages.evaluate(store, eval_cfg, cfg.ray, dataset, samples)
    ended = time.monotonic()
    fid = MetricSample.of(m, "fid")
    if fid is None:
        raise RuntimeError(f"the evaluation of {samples.key} holds no FID")
    train_s, score_s = scoring - started, ended - scoring
    return SegmentScore(
        step=trained.checkpoint.step,
        fid=fid.mean,
        fid_std=fid.std,
        values=fid.values,
        num_images=m.num_images,
        metrics_key=m.key,
        checkpoint_key=trained.checkpoint.key,
        train_s=train_s,
        score_s=score_s,
        device_s=segment_cost(cfg, train_s, score_s),
        ended_at=time.time(),
    )


def _escaped(fn: Callable[..., SegmentScore]) -> Any:
    """`fn` as a Ray task outside the trial's placement group. Tune places each trial in one and
    makes the trial's own tasks and actors land in it too; a trial holds almost nothing (it
    only drives), so the stages' workers must ask the cluster for their devices themselves."""
    import ray

    return ray.remote(fn).options(
        num_cpus=0,
        max_retries=0,  # a failed segment fails the trial; Tune restarts it (trial_max_failures)
        scheduling_strategy="DEFAULT",  # explicit: not the placement group Tune captures into
    )


def _reported_step() -> int:
    """The last step this trial reported to Tune before a restart (its Tune checkpoint), else 0."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder, open(os.path.join(folder, "step.json")) as f:
        return int(json.load(f)["step"])


def _report(segment: SegmentScore, spent: float) -> None:
    """Report a segment to Tune, with a Tune checkpoint that only names its step."""
    from ray import tune

    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "step.json"), "w") as f:
            json.dump({"step": segment.step}, f)
        tune.report(
            {
                "fid": segment.fid,
                "fid_std": segment.fid_std if segment.fid_std is not None else float("nan"),
                "step": segment.step,
                "device_s": spent,
            },
            checkpoint=tune.Checkpoint.from_directory(folder),
        )


def _reserve(
    ledger: Any, trial: str, step: int, steps: int, devices: float, rate: float | None
) -> bool:
    import ray

    while True:
        answer = ray.get(ledger.reserve.remote(trial, step, steps, devices, rate))
        if answer != "wait":
            return bool(answer == "granted")
        time.sleep(1.0)  # another trial measures the first segment


def _own_rate(record: SweepTrial) -> float | None:
    """The trial's last segment's device-seconds per step (None before its first)."""
    segs = record.segments
    if not segs:
        return None
    steps = segs[-1].step - (segs[-2].step if len(segs) > 1 else 0)
    return segs[-1].device_s / steps if steps > 0 else None


def run_trial(
    config: dict[str, Any],
    *,
    sweep: str,
    plans: list[TrialPlan],
    stages: TrialStages,
    dataset: DatasetManifest,
    ledger: Any,
) -> None:
    """Tune's trial function: the trial `plans[config["trial"]]`, segment by segment."""
    import ray

    plan = plans[config["trial"]]
    cfg = plan.config
    logging.basicConfig(level=logging.INFO, force=True)
    logging.getLogger("ray").setLevel(logging.WARNING)
    store = open_store(cfg.storage)
    key = trial_key(sweep, plan.trial_id)
    record = SweepTrial.read_or_none(store, key) or _new_record(sweep, plan)
    if record.step < record.target_step:  # a finished trial found again only reports again
        record = record.model_copy(update={"starts": record.starts + 1, "budget_stop": False})
        record.write(store, key)
    reported = _reported_step()
    done = {s.step: s for s in record.segments}
    devices = train_devices(cfg)
    previous = 0
    for target in plan.segments:
        segment = done.get(target)
        if segment is None:
            rate = _own_rate(record)
            if not _reserve(ledger, plan.trial_id, target, target - previous, devices, rate):
                record = record.model_copy(update={"budget_stop": True})
                record.write(store, key)
                log.info("trial %s: the budget ends it before step %d", plan.trial_id, target)
                return
            try:
                segment = ray.get(_escaped(score_segment).remote(stages, cfg, dataset, target))
            except BaseException:
                ray.get(ledger.release.remote(plan.trial_id))
                raise
            ray.get(
                ledger.settle.remote(plan.trial_id, segment.device_s, target - previous, devices)
            )
            record = record.model_copy(update={"segments": [*record.segments, segment]})
            record.write(store, key)
            log.info(
                "trial %s step %d: FID %.4g (%.0f device-s)",
                plan.trial_id,
                segment.step,
                segment.fid,
                segment.device_s,
            )
        if target > reported:
            _report(segment, record.device_s)
        previous = target


def _scheduler(spec: SweepSpec, plans: Sequence[TrialPlan]) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    s = spec.scheduler
    grace = s.grace_period or spec.segment_steps
    if s.kind == "asha":
        return ASHAScheduler(
            time_attr="step",
            metric="fid",
            mode="min",
            max_t=max_steps(plans),
            grace_period=grace,
            reduction_factor=s.reduction_factor,
        )
    if s.kind == "median":
        return MedianStoppingRule(
            time_attr="step",
            metric="fid",
            mode="min",
            grace_period=grace,
            min_samples_required=max(1, min(3, len(plans) - 1)),
        )
    return FIFOScheduler()


def describe_scheduler(spec: SweepSpec) -> str:
    s = spec.scheduler
    grace = s.grace_period or spec.segment_steps
    if s.kind == "asha":
        return f"ASHA (grace period {grace} steps, reduction factor {s.reduction_factor:g})"
    if s.kind == "median":
        return f"median stopping rule (grace period {grace} steps)"
    return "none (every trial runs to its end)"


def tune_path(spec: SweepSpec, store: Store) -> str:
    """Tune's experiment folder: `tune_storage`, else `sweeps/<name>/tune` of a local store."""
    if spec.tune_storage:
        return spec.tune_storage.rstrip("/") + f"/{spec.name}"
    if not store.config.is_local:
        raise ValueError(
            "a sweep on an S3 store needs tune_storage: a folder (or a URI pyarrow reaches) for "
            "Ray Tune's experiment state, from which a killed sweep resumes"
        )
    return store.path(layout.sweep_tune_prefix(layout.sweep_prefix(spec.name)))


def _check_same_sweep(store: Store, spec: SweepSpec) -> None:
    """A sweep resumed under its name must be the sweep that started (Tune restores its trials by
    index); the first run writes its spec."""
    key = layout.sweep_spec(layout.sweep_prefix(spec.name))
    wanted = spec.model_dump(mode="json")
    if not store.exists(key):
        store.write_json(key, wanted)
        return
    started = store.read_json(key)
    if started != wanted:
        changed = sorted(k for k in {*started, *wanted} if started.get(k) != wanted.get(k))
        raise ValueError(
            f"sweep {spec.name!r} was started with another spec ({', '.join(changed)} differ; "
            f"{store.url(key)}): run it with the file it started with, or give this one another "
            "name"
        )


def run_sweep(
    spec: SweepSpec,
    plans: list[TrialPlan],
    dataset: DatasetManifest,
    stages: TrialStages,
) -> SweepRun:
    """Run (or resume) every trial under Tune; return how each ended."""
    cfg = plans[0].config
    store = open_store(cfg.storage)
    ensure_ray(cfg.ray)
    import ray
    from ray import tune

    records = {
        p.trial_id: SweepTrial.read_or_none(store, trial_key(spec.name, p.trial_id)) for p in plans
    }
    spent = sum(r.device_s for r in records.values() if r is not None)
    ledger: Any = (
        ray.remote(Budget)
        .options(num_cpus=0, **on_driver_node())
        .remote(spec.budget_device_s, spent=spent)
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, sweep=spec.name, plans=plans, stages=stages, dataset=dataset, ledger=ledger
        ),
        # The trial only drives (Ray refuses an empty request): its training and scoring
        # workers hold the devices, outside the trial's placement group (`_escaped`).
        {"memory": 1},
    )
    _check_same_sweep(store, spec)
    path = tune_path(spec, store)
    if tune.Tuner.can_restore(path):
        log.info("resuming sweep %s from %s", spec.name, path)
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        parent, name = os.path.split(path)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(range(len(plans))))},
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(spec, plans), max_concurrent_trials=spec.max_concurrent
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=parent,
                failure_config=tune.FailureConfig(max_failures=spec.trial_max_failures),
                verbose=0,
            ),
        )
    try:
        grid = tuner.fit()
        spent, refused = ray.get(ledger.state.remote())
    finally:
        ray.kill(ledger)
    results = [grid[i] for i in range(len(grid))]
    errors = {r.config["trial"]: r.error for r in results if r.config is not None}
    outcomes = []
    for i, plan in enumerate(plans):
        record = SweepTrial.read_or_none(store, trial_key(spec.name, plan.trial_id))
        record = record or _new_record(spec.name, plan)
        status: SweepStatus
        if record.step >= record.target_step:
            status = "finished"
        elif errors.get(i) is not None:
            status = "failed"
        elif record.budget_stop:
            status = "budget" if record.segments else "not started"
        else:
            status = "stopped"
        outcomes.append(TrialOutcome(trial=record, status=status))
    return SweepRun(outcomes=outcomes, spent_device_s=spent, refused=refused)
