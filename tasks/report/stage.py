"""The reports: every document a person reads, rendered from the records the stages produced.

The nightly report: what each stage did and how long it took, the metrics with their noise, the
sample grid, the loss curve, the metric over nights and the promotion decision with its evidence.

    runs/<run_id>/nightly/<stamp>/report.html   self-contained: its images inlined as data: URIs
    runs/<run_id>/nightly/<stamp>/report.md     the same content; its images beside it:
    runs/<run_id>/nightly/<stamp>/{grid,loss,fid}.png
    runs/<run_id>/nightly/<stamp>/summary.json  the NightlySummary record
    runs/<run_id>/nightly/latest.json           the newest summary (written last)

The content is built once (`build_report`, a `tasks.report.document.Document`) and rendered twice,
to Markdown (also what the Prefect artifact shows) and to HTML.

An evaluation's report: `runs/<run_id>/eval/<set>/report.md` and `grid.png` beside its
metrics.json (`write_evaluation_report`): the sections the nightly report shows of it
(`tasks.report.evaluation`).
"""

from __future__ import annotations

import logging

from tasks import layout
from tasks.config import PricesConfig
from tasks.records import (
    Metrics,
    MetricSample,
    NightlySummary,
    PromotionDecision,
    PromotionHistory,
    RecordFormatError,
    SampleSet,
    ShardResult,
    StageTiming,
    TrainHistory,
    TrainResult,
)
from tasks.report import costs, evaluation, figures
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
from tasks.usage import cost
from tasks.webdata import read_images

log = logging.getLogger(__name__)

# The sections every report has, in order (a test opens report.html and looks for each id).
SECTIONS = (
    "metrics",
    "samples",
    "loss",
    "checkpoints",
    "fid-over-nights",
    "promotion",
    "stages",
    "settings",
)


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _with_noise(sample: MetricSample | None) -> str:
    return "n/a" if sample is None else sample.describe()


def _evidence_rows(d: PromotionDecision) -> list[list[str]]:
    e = d.evidence
    rows = [
        ["challenger", _with_noise(e.challenger), d.checkpoint_key],
        ["champion", _with_noise(e.champion), e.champion_checkpoint_key or "-"],
        ["improvement (champion - challenger)", _num(e.improvement), "lower is better"],
        ["test", e.test or "welch", _TESTS.get(e.test or "welch", "-")],
        [
            "standard error of the improvement",
            _num(e.standard_error),
            _SE.get(e.test or "welch", "-"),
        ],
        [
            "degrees of freedom",
            _num(e.df, 3),
            "k - 1" if e.test == "paired" else "Welch-Satterthwaite",
        ],
        ["margin", _num(e.margin, 3), f"standard errors: t(1 - {e.alpha:g}, df)"],
        [
            "min_improvement",
            "off" if e.min_improvement is None else f"{e.min_improvement:g}",
            "fraction of the champion's value",
        ],
        ["threshold", _num(e.threshold), "the improvement needed to promote"],
        [
            "detectable",
            "-" if e.detectable is None else f"{100 * e.detectable:.2g} %",
            "smaller improvements (of the champion's value) are within the noise",
        ],
    ]
    return rows


_TESTS = {
    "paired": "one-sided paired t over the per-range differences (same seed ranges)",
    "welch": "one-sided Welch t on the two means (decisions before the paired test)",
}
_SE = {"paired": "sd(champion_i - challenger_i) / sqrt(k)", "welch": "sqrt(s1²/k1 + s2²/k2)"}


def _stage_rows(stages: list[StageTiming]) -> list[list[str]]:
    rows = []
    for s in stages:
        reused = "" if s.reused is None else (" (reused)" if s.reused else "")
        rows.append([s.name + reused, f"{s.seconds:.1f} s", s.detail])
    rows.append(["total", f"{sum(s.seconds for s in stages):.1f} s", ""])
    return rows


def _train_history(store: Store, run_id: str) -> TrainHistory | None:
    try:
        return TrainHistory.read(store, layout.train_history(run_id))
    except FileNotFoundError:
        return None
    except RecordFormatError as err:  # the report shows what it can; the run is not failed for it
        log.warning("training history unreadable: %s", err)
        return None


def _checkpoints_section(summary: NightlySummary) -> Section:
    """The checkpoints scored while training ran, the one chosen, and its confirmed score."""
    scores = summary.scores
    if not scores:
        return Section(
            "checkpoints",
            "Checkpoints scored while training",
            [
                Text(
                    "Not scored while training (evaluate.score_every=0): the challenger is the "
                    "night's last checkpoint."
                )
            ],
        )
    chosen = next(
        (s for s in scores if layout.checkpoint(summary.run_id, s.step) == summary.checkpoint_key),
        None,
    )
    confirmed = MetricSample.of(summary.metrics, scores[0].metric)
    rows = [[str(s.step), s.describe(), "chosen" if s is chosen else ""] for s in scores]
    blocks: list[Block] = [
        Text(
            f"{len(scores)} checkpoint(s) scored while training, each on "
            f"{len(scores[0].values)} seed range(s) of {scores[0].num_images} images that the "
            "evaluation never uses. The lowest is the night's challenger; picked as the best of "
            "several noisy scores, its score is biased low (the winner's curse), so it was "
            "scored again on the evaluation's own seed ranges at full n: that confirmed score, "
            "not the selection's, meets the promotion gate."
        ),
        Table(["step", f"{scores[0].metric.upper()} (selection)", ""], rows),
    ]
    if chosen is not None and confirmed is not None:
        blocks.append(
            Text(
                f"Chosen: step {chosen.step}: {chosen.describe()} when chosen; confirmed "
                f"{confirmed.describe(f', n={summary.metrics.num_images}')}.",
                "strong",
            )
        )
    png = (
        figures.metric_over_steps(
            scores, chosen.step, (confirmed.mean, confirmed.std) if confirmed else None
        )
        if chosen is not None
        else None
    )
    blocks.append(Image("scores", png, "scores over steps", "no checkpoint was chosen"))
    return Section("checkpoints", "Checkpoints scored while training", blocks)


def _decisions(store: Store, decision: PromotionDecision) -> list[PromotionDecision]:
    history = PromotionHistory.read_or_none(store, layout.model_history(decision.model_name))
    decisions = [d for d in (history.decisions if history else []) if d.metric == decision.metric]
    return (
        decisions if any(d.night == decision.night for d in decisions) else [*decisions, decision]
    )


def build_report(store: Store, summary: NightlySummary) -> Document:
    """The report's content: reads the grid, the training history and the promotion history."""
    m, d = summary.metrics, summary.promotion
    grid = store.read_bytes(m.grid_key) if store.exists(m.grid_key) else None
    history = _train_history(store, summary.run_id)
    windows = history.windows if history else []
    loss = figures.loss_curve(windows, summary.resumed_from) if windows else None
    decisions = _decisions(store, d)
    verdict = "PROMOTED" if d.promoted else "Not promoted, the champion stays"
    sections = [
        evaluation.metrics_section(m),
        evaluation.samples_section(grid),
        Section(
            "loss",
            "Training loss",
            [
                Text(
                    f"run {summary.run_id}: step {summary.resumed_from or 0} -> {summary.step} "
                    f"tonight ({summary.trained_steps} steps)."
                ),
                Image("loss", loss, "training loss curve", "no training history recorded"),
            ],
        ),
        _checkpoints_section(summary),
        Section(
            "fid-over-nights",
            f"{d.metric.upper()} over nights",
            [
                Text(f"model {d.model_name!r}: {len(decisions)} night(s) of promotion history."),
                Image(
                    "fid",
                    figures.metric_over_nights(decisions) if decisions else None,
                    f"{d.metric} over nights",
                    "no promotion history yet",
                ),
            ],
        ),
        Section(
            "promotion",
            "Promotion decision",
            [
                Text(f"{verdict}. Why: {d.reason}", "strong"),
                Table(["evidence", "value", "note"], _evidence_rows(d)),
            ],
        ),
        Section(
            "stages",
            "Stages",
            [
                Table(["stage", "took", "result"], _stage_rows(summary.stages)),
                *costs.usage_blocks(summary),
            ],
        ),
        evaluation.settings_section(m),
    ]
    assert tuple(s.id for s in sections) == SECTIONS
    title = f"Nightly {summary.stamp}: run {summary.run_id}"
    return Document(title, evaluation.warnings(m), sections)


def write_evaluation_report(
    store: Store, metrics: Metrics, samples: SampleSet, grid_images: int
) -> str:
    """Write an evaluation's grid.png (the first `grid_images` images of its first repeat) and
    report.md beside its metrics.json; returns the report's Markdown."""
    if samples.key != metrics.samples_key:
        raise ValueError(f"metrics of {metrics.samples_key} given with samples {samples.key}")
    keys = [s.key for s in samples.repeat_shards(0)]
    images, _ = read_images(store, keys, samples.channels, min(grid_images, samples.num_images))
    grid = figures.sample_grid(images)
    store.write_bytes(metrics.grid_key, grid)
    markdown = render_markdown(evaluation.document(metrics, grid))
    store.write_text(metrics.report_key, markdown)
    return markdown


def nightly_summary(
    store: Store,
    night: str,
    sharded: ShardResult,
    trained: TrainResult,
    samples: SampleSet,
    metrics: Metrics,
    decision: PromotionDecision,
    stages: list[StageTiming],
    prices: PricesConfig | None = None,
) -> NightlySummary:
    """The night's record, naming where its report goes (`write_nightly_report` writes it);
    with `prices`, what the stages' usage cost."""
    run_id = trained.checkpoint.run_id
    challenger = trained.best or trained.checkpoint
    prefix = layout.nightly_prefix(run_id, night)
    html_key = layout.nightly_report_html(prefix)
    return NightlySummary(
        run_id=run_id,
        stamp=night,
        dataset=sharded.manifest.dataset,
        manifest_key=sharded.manifest.key,
        shards_reused=sharded.reused,
        step=trained.checkpoint.step,
        resumed_from=trained.resumed_from,
        trained_steps=trained.trained_steps,
        checkpoint_key=challenger.key,
        samples_key=samples.key,
        metrics=metrics,
        promotion=decision,
        stages=stages,
        report_key=layout.nightly_report(prefix),
        report_html_key=html_key,
        report_url=store.url(html_key),
        scores=trained.scores,
        cost=None if prices is None else cost(costs.night_usage(stages), prices),
    )


def write_nightly_report(store: Store, summary: NightlySummary) -> Document:
    """Write the night's figures, report.md, report.html and summary.json, then latest.json."""
    prefix = layout.nightly_prefix(summary.run_id, summary.stamp)
    report = build_report(store, summary)
    for figure, png in report.images():
        store.write_bytes(layout.nightly_figure(prefix, figure), png)
    store.write_text(summary.report_key, render_markdown(report))
    store.write_text(summary.report_html_key, render_html(report))
    summary.write(store, layout.nightly_summary(prefix))
    summary.write(store, layout.nightly_latest(summary.run_id))
    log.info("report written to %s", summary.report_url)
    return report
