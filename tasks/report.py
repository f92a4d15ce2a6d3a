"""The nightly report: what each stage did, the evaluation, the promotion decision, in one Markdown file.

runs/<run_id>/nightly/<UTC stamp>/report.md and summary.json
runs/<run_id>/nightly/latest.json   -> the newest summary (written last)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tasks.storage import Store


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_nightly_report(
    store: Store, run_id: str, summary: dict[str, Any], evaluation_md: str
) -> dict[str, Any]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    prefix = f"runs/{run_id}/nightly/{stamp}"
    m, d = summary["metrics"], summary["promotion"]
    lines = [
        f"# Nightly run `{run_id}` — {stamp}",
        "",
        "| stage | result |",
        "|---|---|",
        f"| shard | {summary['dataset']} {'reused' if summary['shards_reused'] else 'written'} ({store.url(summary['manifest_key'])}) |",
        f"| train | step {summary['resumed_from'] or 0} -> {summary['step']} ({summary['trained_steps']} steps) |",
        f"| sample | {m['num_images']} images, {m['sampler']} {m['steps']} steps |",
        f"| evaluate | FID {_fmt(m.get('fid'))} with {m['extractor']['label']} |",
        f"| promote | {'PROMOTED' if d['promoted'] else 'not promoted'}: {d['reason']} |",
        "",
    ]
    if not m["extractor"]["standard"]:
        lines += [
            "> **Warning:** this FID was computed with a non-standard feature extractor; it is NOT comparable "
            "with published FIDs, only with other runs using the same extractor weights "
            f"(sha256 `{m['extractor']['weights_sha256'][:16]}…`).",
            "",
        ]
    lines += ["---", "", evaluation_md]
    report_key = f"{prefix}/report.md"
    store.write_text(report_key, "\n".join(lines))
    full = {
        **summary,
        "report_key": report_key,
        "report_url": store.url(report_key),
        "stamp": stamp,
    }
    store.write_json(f"{prefix}/summary.json", full)
    store.write_json(f"runs/{run_id}/nightly/latest.json", full)
    return full
