"""The reports' figures as PNG bytes: the sample grid, the training loss curve, the metric over
nights and a metric against a cost (the sampler sweep's FID against NFE).

Matplotlib's object API with the Agg canvas: no pyplot, so no global figure state and no GUI
backend, in any thread or Ray worker.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.records import CheckpointScore, LogWindow, PromotionDecision
from tasks.webdata import encode_png

_SIZE = (7.0, 3.2)  # inches, at 100 dpi: 700 x 320 px
_DPI = 100


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def sample_grid(images_uint8: np.ndarray, min_width: int = 384) -> bytes:
    """uint8 [N, C, H, W] -> a square grid as PNG, upscaled (nearest) to at least `min_width` px."""
    n, c, h, w = images_uint8.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1  # a gray line between cells: small images with dark borders would run together
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 96, dtype=np.uint8)
    for i, image in enumerate(images_uint8):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    scale = max(1, math.ceil(min_width / grid.shape[1]))
    return encode_png(grid.repeat(scale, axis=0).repeat(scale, axis=1))


def loss_curve(windows: list[LogWindow], night_start: int | None = None) -> bytes:
    """Training loss per logging window against the step; a dashed line where tonight began."""
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    steps = [w.step for w in windows]
    losses = [w.loss for w in windows]
    ax.plot(steps, losses, marker="." if len(windows) < 40 else None, color="tab:blue")
    if losses and min(losses) > 0:
        ax.set_yscale("log")
    if night_start is not None and night_start > 0:
        ax.axvline(night_start, color="gray", linestyle="--", linewidth=1, label="tonight from")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over ranks and window)")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def metric_over_steps(
    scores: list[CheckpointScore], chosen: int, confirmed: tuple[float, float | None] | None
) -> bytes:
    """The checkpoints scored while training ran (mean ± std over their seed ranges) against the
    step; the chosen one ringed, and its confirmation at full n on fresh seeds beside it."""
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(
        [s.step for s in scores],
        [s.mean for s in scores],
        yerr=[s.std or 0.0 for s in scores],
        fmt="o-",
        color="tab:blue",
        capsize=3,
        label=f"scored while training (n={scores[0].num_images} per range, ± std)",
    )
    best = next(s for s in scores if s.step == chosen)
    ax.plot([chosen], [best.mean], "o", markersize=12, markerfacecolor="none", color="tab:red")
    if confirmed is not None:
        mean, std = confirmed
        ax.errorbar(
            [chosen],
            [mean],
            yerr=[std or 0.0],
            fmt="s",
            color="tab:green",
            capsize=3,
            label="the chosen checkpoint, confirmed (fresh seeds, full n)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(scores[0].metric.upper())
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def metric_over_nights(decisions: list[PromotionDecision]) -> bytes:
    """Each night's challenger (mean ± std over its repeats; filled when promoted) and the
    champion it was weighed against or became."""
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(decisions)))
    for promoted, color, label in ((True, "tab:green", "promoted"), (False, "tab:red", "kept")):
        points = [
            (i, d.evidence.challenger)
            for i, d in enumerate(decisions)
            if d.promoted == promoted and d.evidence.challenger is not None
        ]
        if points:
            ax.errorbar(
                [i for i, _ in points],
                [c.mean for _, c in points],
                yerr=[c.std or 0.0 for _, c in points],
                fmt="o",
                color=color,
                capsize=3,
                label=f"challenger, {label} (± std)",
            )
    champion: list[float] = []
    for d in decisions:
        ch = d.evidence.challenger if d.promoted else d.evidence.champion
        champion.append(ch.mean if ch is not None else float("nan"))
    ax.step(
        x, champion, where="mid", color="black", linewidth=1.2, label="champion after the night"
    )
    every = max(1, math.ceil(len(decisions) / 12))  # at most ~12 labels
    ax.set_xticks(
        x[::every], [d.night[:8] + "\n" + d.night[9:13] for d in decisions[::every]], fontsize=7
    )
    ax.set_ylabel(decisions[0].metric.upper() if decisions else "metric")
    ax.set_xlabel("night (UTC)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def metric_against_cost(
    series: dict[str, list[tuple[float, float, float]]],
    chosen: tuple[float, float],
    *,
    metric: str,
    cost: str,
) -> bytes:
    """One line per series through its (cost, mean, std) points, the std as error bars, cost on a
    log axis; the chosen point circled."""
    fig = Figure(figsize=(7.0, 4.0), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    for label, points in series.items():
        points = sorted(points)
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            fmt="o-",
            capsize=3,
            markersize=4,
            label=label,
        )
    ax.plot(
        [chosen[0]],
        [chosen[1]],
        "o",
        markersize=14,
        markerfacecolor="none",
        markeredgecolor="black",
        label="chosen",
    )
    ax.set_xscale("log")
    costs = sorted({p[0] for points in series.values() for p in points})
    ax.minorticks_off()
    ax.set_xticks(costs, [f"{c:g}" for c in costs], fontsize=7)
    ax.set_xlabel(cost)
    ax.set_ylabel(f"{metric} (mean ± std over the seed ranges)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)
