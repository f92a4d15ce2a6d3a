"""The nightly report: what each stage did and how long it took, the metrics with their noise, the
sample grid, the loss curve, the metric over nights and the promotion decision with its evidence.

    runs/<run_id>/nightly/<stamp>/report.html   self-contained: its images inlined as data: URIs
    runs/<run_id>/nightly/<stamp>/report.md     the same content; its images beside it:
    runs/<run_id>/nightly/<stamp>/{grid,loss,fid}.png
    runs/<run_id>/nightly/<stamp>/summary.json  the NightlySummary record
    runs/<run_id>/nightly/latest.json           the newest summary (written last)

The content is built once (`build_report`, a list of sections) and rendered twice, to Markdown
(`render_markdown`, also what the Prefect artifact shows) and to HTML (`render_html`).
"""

from __future__ import annotations

import base64
import html
import logging
from dataclasses import dataclass
from typing import Literal

from tasks import layout
from tasks.records import (
    MetricName,
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
from tasks.report import figures
from tasks.storage import Store

log = logging.getLogger(__name__)

# The sections every report has, in order (a test opens report.html and looks for each id).
SECTIONS = ("metrics", "samples", "loss", "fid-over-nights", "promotion", "stages", "settings")


@dataclass(frozen=True)
class Text:
    text: str
    style: Literal["plain", "warning", "strong"] = "plain"


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    figure: layout.NightlyFigure
    png: bytes | None
    alt: str
    missing: str  # shown instead when there is no image


Block = Text | Table | Image


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    blocks: list[Block]


@dataclass(frozen=True)
class Report:
    title: str
    warnings: list[str]
    sections: list[Section]


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _with_noise(sample: MetricSample | None) -> str:
    return "n/a" if sample is None else sample.describe()


def _metric_rows(m: Metrics) -> list[list[str]]:
    rows = []
    named: tuple[tuple[str, MetricName], ...] = (("FID", "fid"), ("KID", "kid"))
    for name, metric in named:
        sample = MetricSample.of(m, metric)
        if sample is not None:
            per_repeat = ", ".join(f"{v:#.4g}" for v in sample.values)
            rows.append([name, _with_noise(sample), str(sample.k), per_repeat or "-"])
    if m.kid_std is not None:
        rows.append(["KID spread over subsets", _num(m.kid_std), "-", f"{m.kid_subsets} subsets"])
    if m.isc_mean is not None:
        rows.append(
            ["IS", f"{_num(m.isc_mean)} ± {_num(m.isc_std, 2)} (std over splits)", "-", "-"]
        )
    return rows


def _evidence_rows(d: PromotionDecision) -> list[list[str]]:
    e = d.evidence
    rows = [
        ["challenger", _with_noise(e.challenger), d.checkpoint_key],
        ["champion", _with_noise(e.champion), e.champion_checkpoint_key or "-"],
        ["improvement (champion - challenger)", _num(e.improvement), "lower is better"],
        ["standard error of the improvement", _num(e.standard_error), "sqrt(s1²/k1 + s2²/k2)"],
        ["degrees of freedom", _num(e.df, 3), "Welch-Satterthwaite"],
        ["margin", _num(e.margin, 3), f"standard errors: t(1 - {e.alpha:g}, df)"],
        [
            "min_improvement",
            "off" if e.min_improvement is None else f"{e.min_improvement:g}",
            "fraction of the champion's value",
        ],
        ["threshold", _num(e.threshold), "the improvement needed to promote"],
    ]
    return rows


def _stage_rows(stages: list[StageTiming]) -> list[list[str]]:
    rows = []
    for s in stages:
        reused = "" if s.reused is None else (" (reused)" if s.reused else "")
        rows.append([s.name + reused, f"{s.seconds:.1f} s", s.detail])
    rows.append(["total", f"{sum(s.seconds for s in stages):.1f} s", ""])
    return rows


def _settings_rows(m: Metrics) -> list[list[str]]:
    sc = m.sampling
    ranges = ", ".join(f"{a}..{b - 1}" for a, b in m.seed_ranges) or (
        f"{sc.seed_start}..{sc.seed_start + m.num_images - 1}"
    )
    rows = [
        ["sampler", f"{sc.sampler}, {sc.steps} steps, {sc.spacing} spacing, eta {sc.eta:g}"],
        ["guidance scale", f"{sc.guidance_scale:g}"],
        ["weights", m.weights],
        ["images", f"{m.repeats} x {m.num_images} (seeds {ranges})"],
        ["held-out images", str(m.num_reference_images)],
        ["reference statistics", str(m.reference_stats_key)],
        ["extractor", f"{m.extractor.label} (sha256 {m.extractor.weights_sha256[:16]}…)"],
        ["checkpoint", f"{m.checkpoint_key} (step {m.checkpoint_step})"],
        ["evaluated", m.created],
    ]
    if m.provenance is not None:
        p = m.provenance
        rows += [
            ["code", f"diffusion-pipeline {p.package_version}, commit {p.git_commit or 'unknown'}"],
            ["libraries", f"torch {p.torch}, torch-fidelity {p.torch_fidelity}"],
            ["device", p.device],
        ]
    return rows


def _train_history(store: Store, run_id: str) -> TrainHistory | None:
    try:
        return TrainHistory.read(store, layout.train_history(run_id))
    except FileNotFoundError:
        return None
    except RecordFormatError as err:  # the report shows what it can; the run is not failed for it
        log.warning("training history unreadable: %s", err)
        return None


def _decisions(store: Store, decision: PromotionDecision) -> list[PromotionDecision]:
    history = PromotionHistory.read_or_none(store, layout.model_history(decision.model_name))
    decisions = [d for d in (history.decisions if history else []) if d.metric == decision.metric]
    return (
        decisions if any(d.night == decision.night for d in decisions) else [*decisions, decision]
    )


def build_report(store: Store, summary: NightlySummary) -> Report:
    """The report's content: reads the grid, the training history and the promotion history."""
    m, d = summary.metrics, summary.promotion
    warnings = [f"NOT TRUSTWORTHY: {p}. This evaluation is never promoted." for p in m.problems]
    if not m.extractor.standard:
        warnings.append(
            f"FID computed with a stand-in extractor ({m.extractor.label}): NOT comparable with "
            "published FIDs, only with runs that report the same extractor sha256 "
            f"{m.extractor.weights_sha256[:16]}."
        )
    grid = store.read_bytes(m.grid_key) if store.exists(m.grid_key) else None
    history = _train_history(store, summary.run_id)
    windows = history.windows if history else []
    loss = figures.loss_curve(windows, summary.resumed_from) if windows else None
    decisions = _decisions(store, d)
    noise = (
        "the noise is the sample standard deviation over the repeats (disjoint seed ranges)"
        if m.repeats > 1
        else "noise not measured: evaluate.repeats=1 (set it to 2 or more)"
    )
    verdict = "PROMOTED" if d.promoted else "Not promoted, the champion stays"
    sections = [
        Section(
            "metrics",
            "Metrics and their noise",
            [
                Text(
                    f"{m.repeats} x {m.num_images} samples vs {m.num_reference_images} held-out images; {noise}."
                ),
                Table(["metric", "mean ± std", "k", "per repeat"], _metric_rows(m)),
            ],
        ),
        Section(
            "samples",
            "Samples",
            [Image("grid", grid, "sample grid", "no sample grid was written")],
        ),
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
            "stages", "Stages", [Table(["stage", "took", "result"], _stage_rows(summary.stages))]
        ),
        Section(
            "settings", "Evaluation settings", [Table(["setting", "value"], _settings_rows(m))]
        ),
    ]
    assert tuple(s.id for s in sections) == SECTIONS
    return Report(f"Nightly {summary.stamp}: run {summary.run_id}", warnings, sections)


# -- rendering -----------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report, images: bool = True) -> str:
    """Markdown; `images` links each figure by its file name (they sit beside report.md),
    otherwise (a Prefect artifact) a figure is named, not shown."""
    lines = [f"# {report.title}", ""]
    lines += [line for w in report.warnings for line in (f"> **WARNING: {w}**", "")]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [f"**{block.text}**" if block.style == "strong" else block.text, ""]
            elif isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
            elif block.png is None:
                lines += [f"_{block.missing}_", ""]
            elif images:
                lines += [f"![{block.alt}]({block.figure}.png)", ""]
            else:
                lines += [f"_{block.alt}: in the HTML report_", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
th { background: #f2f2f2; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.5rem 1rem; }
.missing { color: #777; font-style: italic; }
img { max-width: 100%; image-rendering: pixelated; }
"""

# Marks the page once loaded: how many of its images decoded (a headless-browser test reads it).
_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
});
"""


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, images as data: URIs, nothing fetched."""
    e = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(report.title)}</h1>",
    ]
    out += [f'<p class="warning"><strong>WARNING: {e(w)}</strong></p>' for w in report.warnings]
    for section in report.sections:
        out.append(f'<section id="{section.id}"><h2>{e(section.title)}</h2>')
        for block in section.blocks:
            if isinstance(block, Text):
                text = e(block.text)
                out.append(
                    f"<p><strong>{text}</strong></p>"
                    if block.style == "strong"
                    else f"<p>{text}</p>"
                )
            elif isinstance(block, Table):
                out.append(
                    "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in block.header) + "</tr>"
                )
                out += [
                    "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                    for row in block.rows
                ]
                out.append("</table>")
            elif block.png is None:
                out.append(f'<p class="missing">{e(block.missing)}</p>')
            else:
                data = base64.b64encode(block.png).decode("ascii")
                out.append(
                    f'<img id="{block.figure}" alt="{e(block.alt)}" src="data:image/png;base64,{data}">'
                )
        out.append("</section>")
    out += [f"<script>{_SCRIPT}</script>", "</body></html>", ""]
    return "\n".join(out)


def nightly_summary(
    store: Store,
    night: str,
    sharded: ShardResult,
    trained: TrainResult,
    samples: SampleSet,
    metrics: Metrics,
    decision: PromotionDecision,
    stages: list[StageTiming],
) -> NightlySummary:
    """The night's record, naming where its report goes (`write_nightly_report` writes it)."""
    run_id = trained.checkpoint.run_id
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
        checkpoint_key=trained.checkpoint.key,
        samples_key=samples.key,
        metrics=metrics,
        promotion=decision,
        stages=stages,
        report_key=layout.nightly_report(prefix),
        report_html_key=html_key,
        report_url=store.url(html_key),
    )


def write_nightly_report(store: Store, summary: NightlySummary) -> Report:
    """Write the night's figures, report.md, report.html and summary.json, then latest.json."""
    prefix = layout.nightly_prefix(summary.run_id, summary.stamp)
    report = build_report(store, summary)
    for section in report.sections:
        for block in section.blocks:
            if isinstance(block, Image) and block.png is not None:
                store.write_bytes(layout.nightly_figure(prefix, block.figure), block.png)
    store.write_text(summary.report_key, render_markdown(report))
    store.write_text(summary.report_html_key, render_html(report))
    summary.write(store, layout.nightly_summary(prefix))
    summary.write(store, layout.nightly_latest(summary.run_id))
    log.info("report written to %s", summary.report_url)
    return report
