"""The nightly report: what each stage did, the evaluation, the promotion decision, in one Markdown file.

runs/<run_id>/nightly/<UTC stamp>/report.md and summary.json
runs/<run_id>/nightly/latest.json   -> the newest summary (written last)
"""

from __future__ import annotations

from datetime import UTC, datetime

from tasks import layout
from tasks.records import (
    Evaluation,
    NightlySummary,
    PromotionDecision,
    SampleSet,
    ShardResult,
    TrainResult,
)
from tasks.storage import Store


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_nightly_report(
    store: Store,
    sharded: ShardResult,
    trained: TrainResult,
    samples: SampleSet,
    evaluation: Evaluation,
    decision: PromotionDecision,
) -> NightlySummary:
    run_id = trained.checkpoint.run_id
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = layout.nightly_prefix(run_id, stamp)
    m, manifest = evaluation.metrics, sharded.manifest
    lines = [
        f"# Nightly run `{run_id}` — {stamp}",
        "",
        "| stage | result |",
        "|---|---|",
        f"| shard | {manifest.dataset} {'reused' if sharded.reused else 'written'} ({store.url(manifest.key)}) |",
        f"| train | step {trained.resumed_from or 0} -> {trained.checkpoint.step} ({trained.trained_steps} steps) |",
        f"| sample | {m.num_images} images, {m.sampling.sampler} {m.sampling.steps} steps |",
        f"| evaluate | FID {_fmt(m.fid)} with {m.extractor.label} |",
        f"| promote | {'PROMOTED' if decision.promoted else 'not promoted'}: {decision.reason} |",
        "",
    ]
    if not m.extractor.standard:
        lines += [
            "> **Warning:** this FID was computed with a non-standard feature extractor; it is NOT comparable "
            "with published FIDs, only with other runs using the same extractor weights "
            f"(sha256 `{m.extractor.weights_sha256[:16]}…`).",
            "",
        ]
    lines += ["---", "", evaluation.report_markdown]
    report_key = layout.nightly_report(prefix)
    store.write_text(report_key, "\n".join(lines))
    summary = NightlySummary(
        run_id=run_id,
        stamp=stamp,
        dataset=manifest.dataset,
        manifest_key=manifest.key,
        shards_reused=sharded.reused,
        step=trained.checkpoint.step,
        resumed_from=trained.resumed_from,
        trained_steps=trained.trained_steps,
        checkpoint_key=trained.checkpoint.key,
        samples_key=samples.key,
        metrics=m,
        promotion=decision,
        report_key=report_key,
        report_url=store.url(report_key),
    )
    summary.write(store, layout.nightly_summary(prefix))
    summary.write(store, layout.nightly_latest(run_id))
    return summary
