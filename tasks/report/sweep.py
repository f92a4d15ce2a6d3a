"""The report of a sweep over training settings (`diffpipe sweep`):

    sweeps/<name>/report.html  self-contained: its figure inlined
    sweeps/<name>/report.md    the same content, fid.png beside it
    sweeps/<name>/sweep.json   the SweepResult record

Every trial with its settings, the step it reached, its last FID with the sampling noise, the
device-seconds it reserved and how it ended; FID over steps per trial; the spread of FID over
training seeds beside the sampling noise; the winner confirmed on the evaluation's own seed
ranges at full n; and the command that hands the winning run to the nightly.
"""

from __future__ import annotations

import logging

from matplotlib.figure import Figure

from tasks import layout
from tasks.records import MetricSample, SweepResult, TrialOutcome, with_noise
from tasks.report import figures
from tasks.report.document import (
    Block,
    Document,
    Image,
    Section,
    Table,
    Text,
    render_html,
    render_markdown,
)
from tasks.storage import Store

log = logging.getLogger(__name__)

SWEEP_SECTIONS = ("result", "trials", "figure", "seeds", "scoring")


def _settings(o: TrialOutcome) -> str:
    return (
        ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in o.trial.settings.items()
        )
        or "(base)"
    )


def sweep_figure(result: SweepResult) -> bytes | None:
    """FID (mean ± std over the scoring seed ranges) against the step, one line per trial."""
    scored = [o for o in result.trials if o.trial.segments]
    if not scored:
        return None
    fig = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for o in scored:
        segs = o.trial.segments
        ax.errorbar(
            [s.step for s in segs],
            [s.fid for s in segs],
            yerr=[s.fid_std or 0.0 for s in segs],
            fmt="o-" if o.status == "finished" else "x--",
            capsize=3,
            markersize=4,
            label=f"{o.trial.trial_id} ({o.status})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("FID (small n, ± std over seed ranges)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return figures._png(fig)


def sweep_document(result: SweepResult, figure: bytes | None) -> Document:
    unit = result.device_unit
    by_id = {o.trial.trial_id: o for o in result.trials}
    summary: list[Block] = []
    warnings: list[str] = []
    if result.winner is None:
        summary.append(Text("No trial finished: no winner.", "strong"))
    else:
        w = by_id[result.winner]
        last = w.trial.segments[-1]
        summary.append(
            Text(
                f"Winner: {w.trial.trial_id} (run {w.trial.run_id}; {_settings(w)}; train.seed "
                f"{w.trial.seed}): FID {with_noise(last.fid, last.fid_std, len(last.values))} "
                f"at step {last.step} (n={last.num_images} per seed range)",
                "strong",
            )
        )
        c = result.confirmation
        fid = MetricSample.of(c, "fid") if c is not None else None
        if c is not None and fid is not None:
            summary.append(
                Text(
                    f"Confirmed on the evaluation's own seed ranges at full n: FID "
                    f"{fid.describe(f', n={c.num_images}')} ({c.key}). The sweep's FIDs won a "
                    "contest among noisy scores (the winner's curse); this one did not."
                )
            )
        if result.handoff:
            summary.append(Text(f"Hand it to the nightly: {result.handoff}"))
    summary.append(
        Text(
            f"Scheduler: {result.scheduler}. Device-seconds spent: {result.spent_device_s:.0f} "
            f"{unit}-s"
            + (f" of a budget of {result.budget_device_s:.0f}." if result.budget_device_s else ".")
        )
    )
    if result.budget_note:
        summary.append(Text(f"Stopped by the budget: {result.budget_note}", "warning"))
        warnings.append(result.budget_note)
    rows = [
        [
            o.trial.trial_id,
            _settings(o),
            str(o.trial.seed),
            f"{o.trial.step}/{o.trial.target_step}",
            "-"
            if not o.trial.segments
            else with_noise(
                o.trial.segments[-1].fid,
                o.trial.segments[-1].fid_std,
                len(o.trial.segments[-1].values),
            ),
            f"{o.trial.device_s:.0f}",
            o.status + (" (WINNER)" if o.trial.trial_id == result.winner else ""),
        ]
        for o in result.trials
    ]
    header = ["trial", "settings", "seed", "steps", "FID ± noise (last)", f"{unit}-s", "ended"]
    spread_rows = [
        [
            ", ".join(o.trial.trial_id for o in result.trials if o.trial.config_id == s.config_id),
            str(s.step),
            ", ".join(f"{v:.4g}" for v in s.fids),
            "-" if s.seed_std is None else f"{s.seed_std:.3g}",
            "-" if s.sampling_std is None else f"{s.sampling_std:.3g}",
        ]
        for s in result.spreads
    ]
    spread_text = Text(
        "Retraining with another train.seed moves FID more than resampling does: a winner must "
        "beat the spread over training seeds, not only the sampling noise."
    )
    sections = [
        Section("result", "The result", summary),
        Section("trials", "Every trial", [Table(header, rows)]),
        Section(
            "figure",
            "FID over steps",
            [Image("fid", figure, "FID over steps, per trial", "no trial was scored")],
        ),
        Section(
            "seeds",
            "Spread over training seeds",
            [
                spread_text,
                Table(
                    ["trials (one setting)", "step", "FIDs", "std over seeds", "sampling std"],
                    spread_rows,
                ),
            ],
        ),
        Section(
            "scoring",
            "How trials were scored",
            [
                Text(
                    "Each trial trains in segments (the run's exact resume) and scores each "
                    "segment's checkpoint on small seed ranges of its own (evaluate.score_images "
                    "x evaluate.score_repeats from evaluate.score_seed_start); the scheduler "
                    "ends the losers between segments. Device-seconds are reserved devices x "
                    "wall seconds (training workers, then one sampling and one feature worker)."
                )
            ],
        ),
    ]
    assert tuple(s.id for s in sections) == SWEEP_SECTIONS
    return Document(f"Sweep {result.name}", warnings, sections)


def write_sweep_report(store: Store, result: SweepResult) -> Document:
    """Write the sweep's figure, report.md, report.html, then its sweep.json."""
    prefix = layout.sweep_prefix(result.name)
    figure = sweep_figure(result)
    document = sweep_document(result, figure)
    if figure is not None:
        store.write_bytes(layout.sweep_figure(prefix), figure)
    store.write_text(result.report_key, render_markdown(document))
    store.write_text(result.report_html_key, render_html(document))
    result.write(store, layout.sweep_record(prefix))
    log.info("sweep report written to %s", result.report_url)
    return document
