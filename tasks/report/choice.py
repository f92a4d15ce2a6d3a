"""The report of a choice among settings: each setting's score with its noise and its cost, which
settings are within the noise of the best, and the one chosen.

A sampler sweep (`diffpipe samplers`):

    runs/<run_id>/choices/samplers-<stamp>/report.html  self-contained: its figure inlined
    runs/<run_id>/choices/samplers-<stamp>/report.md    the same content, fid.png beside it
    runs/<run_id>/choices/samplers-<stamp>/choice.json  the SamplerChoice record

A post-hoc EMA length (`diffpipe ema`): `runs/<run_id>/choices/ema-<stamp>/` holds report.md,
report.html (no figure) and choice.json, the EmaChoice record.
"""

from __future__ import annotations

import logging

from tasks import layout
from tasks.records import EmaChoice, SamplerChoice, ScoredSetting, with_noise
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

# The sections of a sampler sweep's report, in order.
SAMPLER_SECTIONS = ("choice", "settings", "figure", "evaluation")


def _score(s: ScoredSetting, k: int) -> str:
    return with_noise(s.mean, s.std, k)


def _series(choice: SamplerChoice) -> dict[str, list[tuple[float, float, float]]]:
    """The settings by everything but their step count: one line each in the figure."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for s in choice.settings:
        label = f"{s.sampler}, {s.spacing}"
        label += f", guidance {s.guidance_scale:g}" if s.guidance_scale != 1.0 else ""
        label += f", eta {s.eta:g}" if s.eta != 0.0 else ""
        series.setdefault(label, []).append((float(s.nfe), s.mean, s.std or 0.0))
    return series


def sampler_figure(choice: SamplerChoice) -> bytes:
    """The metric against NFE with its spread over the seed ranges; the chosen setting circled."""
    chosen = choice.chosen
    return figures.metric_against_cost(
        _series(choice),
        (float(chosen.nfe), chosen.mean),
        metric=choice.metric.upper(),
        cost="network evaluations per image (NFE)",
    )


def sampler_document(choice: SamplerChoice, figure: bytes | None) -> Document:
    k, metric = choice.repeats, choice.metric.upper()
    chosen, best = choice.chosen, choice.best
    within = "it is the best" if chosen.best else "within the noise of the best"
    summary: list[Block] = [
        Text(f"Chosen: {chosen.name}, {chosen.nfe} NFE: {metric} {_score(chosen, k)}", "strong"),
        Text(
            f"Best: {best.name}, {best.nfe} NFE: {metric} {_score(best, k)}. The chosen setting "
            f"is the cheapest (fewest network evaluations per image) of those {within}: a "
            f"one-sided paired t-test at alpha = {choice.alpha:g} over the {k} shared seed ranges "
            "cannot call it worse than the best."
        ),
        Text(f"Use it: {chosen.command}"),
        Text(
            "The best of many noisy scores is optimistic (the winner's curse): confirm a choice "
            "that matters on fresh seed ranges (another sample.seed_start)."
        ),
    ]
    warnings = []
    if k < 2:
        warnings.append(
            f"noise not measured (evaluate.repeats={k}): the best setting is chosen whatever it "
            "costs; use evaluate.repeats >= 2 to choose the cheapest within the noise"
        )
    if not choice.comparable_with_published:
        warnings.append(
            f"{metric} from {choice.extractor}: NOT comparable with published numbers, only "
            "with each other"
        )
    warnings += [f"{s.name}: {p} (never chosen)" for s in choice.settings for p in s.problems]
    rows = [
        [
            s.name,
            str(s.nfe),
            _score(s, k),
            ", ".join(f"{v:.4g}" for v in s.values),
            "yes" if s.within_noise else "no",
            "CHOSEN" if s.chosen else ("best" if s.best else ""),
        ]
        for s in sorted(choice.settings, key=lambda s: (s.nfe, s.mean))
    ]
    header = ["setting", "NFE", f"{metric} mean ± std", "per seed range", "within noise", "chosen"]
    settings: list[Block] = [
        Text(f"Checkpoint: {choice.checkpoint_key} (run {choice.run_id}, step {choice.step})."),
        Text(
            f"Every setting sampled the same {k} seed ranges of {choice.num_images} images each: "
            + ", ".join(f"{a}..{b - 1}" for a, b in choice.seed_ranges)
            + f". Extractor: {choice.extractor}."
        ),
    ]
    sections = [
        Section("choice", "The choice", summary),
        Section("settings", "Every setting", [Table(header, rows)]),
        Section(
            "figure",
            f"{metric} against NFE",
            [Image("fid", figure, f"{metric} against NFE", "no figure was drawn")],
        ),
        Section("evaluation", "How they were scored", settings),
    ]
    assert tuple(s.id for s in sections) == SAMPLER_SECTIONS
    title = f"Sampler sweep {choice.stamp}: run {choice.run_id}, step {choice.step}"
    return Document(title, warnings, sections)


def write_sampler_report(store: Store, choice: SamplerChoice) -> Document:
    """Write the sweep's figure, report.md, report.html, then its choice.json."""
    prefix = layout.sampler_choice_prefix(choice.run_id, choice.stamp)
    figure = sampler_figure(choice)
    document = sampler_document(choice, figure)
    store.write_bytes(layout.sampler_choice_figure(prefix), figure)
    store.write_text(choice.report_key, render_markdown(document))
    store.write_text(choice.report_html_key, render_html(document))
    choice.write(store, layout.sampler_choice_record(prefix))
    log.info("sampler sweep report written to %s", choice.report_url)
    return document


# -- post-hoc EMA ----------------------------------------------------------------------------------
# The sections of an EMA-length choice's report, in order.
EMA_SECTIONS = ("choice", "lengths", "evaluation")


def ema_document(choice: EmaChoice) -> Document:
    """The lengths rebuilt, their FIDs with the noise over the shared seed ranges, the choice."""
    k = choice.repeats
    by_sigma = {c.sigma_rel: c for c in choice.candidates}
    chosen, best = by_sigma[choice.chosen], by_sigma[choice.best]
    assert chosen.fid is not None
    within = [f"{c.sigma_rel:g}" for c in choice.candidates if c.within_noise]
    summary: list[Block] = [
        Text(
            f"Chosen: sigma_rel {chosen.sigma_rel:g}: FID "
            f"{with_noise(chosen.fid, chosen.fid_std, k)}",
            "strong",
        ),
        Text(
            f"It has the lowest mean FID over the {k} shared seed ranges (every length costs the "
            "same to sample). Within the noise of it (a one-sided paired t-test at alpha = "
            f"{choice.alpha:g} cannot call them worse): sigma_rel {', '.join(within)}."
        ),
        Text(f"Use it: sample {chosen.checkpoint_key} (its EMA weights are the rebuilt ones)."),
        Text(
            "The best of several noisy scores is optimistic (the winner's curse): confirm the "
            "chosen length on fresh seed ranges (another sample.seed_start) before relying on it."
        ),
    ]
    warnings = []
    if k < 2:
        warnings.append(
            f"noise not measured (evaluate.repeats={k}): the lowest FID is chosen, and no other "
            "length can be told from it or not; use evaluate.repeats >= 2"
        )
    if not choice.extractor.standard:
        warnings.append(
            f"FID from {choice.extractor.label}: these scores compare the widths with each "
            "other only"
        )
    warnings += [
        f"sigma_rel {c.sigma_rel:g}: {p} (never chosen)"
        for c in choice.candidates
        for p in c.problems
    ]
    rows = [
        [
            f"{c.sigma_rel:g}",
            "n/a" if c.fid is None else with_noise(c.fid, c.fid_std, k),
            ", ".join(f"{v:.4g}" for v in c.fids) or "-",
            "yes" if c.within_noise else "no",
            "CHOSEN" if c is chosen else ("best" if c is best else ""),
        ]
        for c in sorted(choice.candidates, key=lambda c: c.sigma_rel)
    ]
    header = ["sigma_rel", "FID mean ± std", "per seed range", "within noise of best", "chosen"]
    sc = choice.sampling
    steps = choice.snapshot_steps
    evaluation: list[Block] = [
        Text(
            f"Rebuilt at step {choice.step} of run {choice.run_id} from the power-EMA snapshots "
            f"of sigma_rel {', '.join(f'{s:g}' for s in choice.snapshot_sigma_rels)} at "
            f"{len(steps)} steps ({steps[0]}..{steps[-1]}), by EDM2's least-squares fit."
        ),
        Text(
            f"Every length sampled the same {k} seed ranges of {choice.num_images} images each ("
            + ", ".join(f"{a}..{b - 1}" for a, b in choice.seed_ranges)
            + f") with {sc.sampler}, {sc.steps} steps, {sc.spacing} spacing, and was scored "
            f"against {choice.num_reference_images} held-out images with {choice.extractor.label}."
        ),
    ]
    sections = [
        Section("choice", "The choice", summary),
        Section("lengths", "Every EMA length", [Table(header, rows)]),
        Section("evaluation", "How they were rebuilt and scored", evaluation),
    ]
    assert tuple(s.id for s in sections) == EMA_SECTIONS
    title = f"Post-hoc EMA length {choice.stamp}: run {choice.run_id}, step {choice.step}"
    return Document(title, warnings, sections)


def write_ema_report(store: Store, choice: EmaChoice) -> Document:
    """Write the choice's report.md and report.html, then its choice.json."""
    document = ema_document(choice)
    store.write_text(choice.report_key, render_markdown(document))
    store.write_text(choice.report_html_key, render_html(document))
    choice.write(store, choice.key)
    log.info("post-hoc EMA report written to %s", choice.report_url)
    return document
