"""How a night's usage reads in its report: each stage's device time, bytes and object-store
requests (`tasks.usage`, counted where they happened), and the cost line when prices are set."""

from __future__ import annotations

from tasks.records import NightlySummary, StageTiming
from tasks.report.document import Block, Table, Text
from tasks.usage import KINDS, Usage, size


def _requests(u: Usage) -> str:
    kinds = ", ".join(f"{k} {u.requests[k]}" for k in KINDS if u.requests.get(k))
    return f"{sum(u.requests.values())}" + (f" ({kinds})" if kinds else "")


def _row(name: str, u: Usage) -> list[str]:
    return [
        name,
        f"{u.cpu_s:.1f}",
        f"{u.gpu_s:.1f}",
        size(u.bytes_read),
        size(u.bytes_written),
        _requests(u),
    ]


def night_usage(stages: list[StageTiming]) -> Usage:
    """The stages' usage summed (stages recorded before usage was counted add nothing)."""
    return sum((s.usage for s in stages if s.usage is not None), Usage())


def usage_blocks(summary: NightlySummary) -> list[Block]:
    """The stages' usage table and the cost line (or how to get one)."""
    measured = [s for s in summary.stages if s.usage is not None]
    if not measured:
        return []
    rows = [_row(s.name, s.usage) for s in measured if s.usage is not None]
    rows.append(_row("total", night_usage(measured)))
    blocks: list[Block] = [
        Table(["stage", "CPU s", "GPU s", "read", "written", "object-store requests"], rows)
    ]
    if summary.cost is not None:
        blocks.append(Text(f"Cost of the night: {summary.cost.describe()}.", "strong"))
    else:
        blocks.append(Text("No prices configured: set the `prices` section for a cost line."))
    return blocks
