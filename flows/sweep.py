"""`sweep_flow` (`diffpipe sweep -c sweep.yaml`): a sweep over training settings on one cluster.

Every trial is an ordinary training run (`<sweep>-tNN`) that Ray Tune trains in segments, each
segment's checkpoint scored small; ASHA or the median rule ends the losers; a budget in
device-seconds is never crossed by a segment it could foresee. The finished trial with the lowest
FID wins and is confirmed at full n on the evaluation's own seed ranges (sample + evaluate of its
final checkpoint, as the nightly evaluates); the report shows every trial and says how to hand the
winning run to the nightly. Run again, the same command resumes a killed sweep.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.stages import evaluate_task, sample_task, shard_task
from tasks import layout
from tasks.evaluate.stage import evaluate
from tasks.records import Checkpoint, SweepResult
from tasks.report.document import render_markdown
from tasks.report.sweep import write_sweep_report
from tasks.runtime import setup_process
from tasks.sample.stage import sample_images
from tasks.storage import open_store
from tasks.sweep.budget import device_unit
from tasks.sweep.result import budget_note, handoff_command, seed_spreads, winner
from tasks.sweep.spec import plan_trials, read_spec
from tasks.sweep.stage import TrialStages, describe_scheduler, run_sweep
from tasks.train.stage import train

# The stages a trial composes, by reference: Ray's workers import them from tasks/.
STAGES = TrialStages(train=train, sample=sample_images, evaluate=evaluate)


@flow(name="sweep")
def sweep_flow(sweep_path: str, confirm: bool = True) -> SweepResult:
    """Run (or resume) the sweep of `sweep_path`; confirm the winner at full n (`confirm`);
    write the report. Returns the SweepResult, every trial included."""
    setup_process()
    logger = get_run_logger()
    spec = read_spec(sweep_path)
    plans = plan_trials(spec)  # every trial's config validated before anything runs
    cfg = plans[0].config
    store = open_store(cfg.storage)
    logger.info(
        "sweep %s: %d trials (%d settings x %d seeds), %s, budget %s",
        spec.name,
        len(plans),
        len(plans) // spec.seeds,
        spec.seeds,
        describe_scheduler(spec),
        "none" if spec.budget_device_s is None else f"{spec.budget_device_s:g} device-s",
    )
    dataset = shard_task(cfg.data, cfg.storage, cfg.ray).manifest
    ran = run_sweep(spec, plans, dataset, STAGES)
    unit = device_unit(cfg)
    best = winner(ran.outcomes)
    confirmation, handoff = None, None
    if best is not None:
        plan = next(p for p in plans if p.trial_id == best.trial.trial_id)
        handoff = handoff_command(spec, plan)
        if confirm:
            checkpoint = Checkpoint.require_latest(store, plan.run_id)
            c = plan.config
            samples = sample_task(c.sample, c.ray, c.storage, checkpoint, c.evaluate.repeats)
            confirmation = evaluate_task(c.evaluate, c.ray, c.storage, dataset, samples).metrics
    prefix = layout.sweep_prefix(spec.name)
    html_key = layout.sweep_report_html(prefix)
    result = SweepResult(
        name=spec.name,
        scheduler=describe_scheduler(spec),
        budget_device_s=spec.budget_device_s,
        device_unit=unit,
        spent_device_s=ran.spent_device_s,
        budget_note=budget_note(
            ran.outcomes, spec.budget_device_s, ran.spent_device_s, ran.refused, unit
        ),
        trials=ran.outcomes,
        spreads=seed_spreads(ran.outcomes),
        winner=best.trial.trial_id if best else None,
        confirmation=confirmation,
        handoff=handoff,
        report_key=layout.sweep_report(prefix),
        report_html_key=html_key,
        report_url=store.url(html_key),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    document = write_sweep_report(store, result)
    create_markdown_artifact(
        render_markdown(document, images=False) + f"\n\nThe report: {result.report_url}\n",
        key="sweep-report",
        description=f"sweep {spec.name}",
    )
    create_link_artifact(result.report_url, link_text="the sweep's report", key="sweep-report-html")
    if result.budget_note:
        logger.info("stopped by the budget: %s", result.budget_note)
    logger.info("sweep %s: winner %s; report %s", spec.name, result.winner, result.report_url)
    return result
