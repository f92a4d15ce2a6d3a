"""How an evaluation reads, wherever it is shown: its warnings, its metrics with their noise, its
sample grid and its settings. The evaluation's own report.md is these sections alone
(`document`); the nightly report places them among its own.
"""

from __future__ import annotations

from tasks.records import METRICS, Metrics, MetricSample, with_noise
from tasks.report.document import Document, Image, Section, Table, Text


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def warnings(m: Metrics) -> list[str]:
    """Why these numbers must not be trusted, or not be compared with published ones."""
    out = [f"NOT TRUSTWORTHY: {p}. This evaluation is never promoted." for p in m.problems]
    if not m.extractor.standard:
        out.append(
            f"FID computed with a stand-in extractor ({m.extractor.label}): NOT comparable with "
            "published FIDs, only with runs that report the same extractor sha256 "
            f"{m.extractor.weights_sha256[:16]}."
        )
    return out


def metrics_section(m: Metrics) -> Section:
    noise = (
        "the noise is the sample standard deviation over the repeats (disjoint seed ranges)"
        if m.repeats > 1
        else "noise not measured: evaluate.repeats=1 (set it to 2 or more)"
    )
    rows = []
    for metric in METRICS:
        sample = MetricSample.of(m, metric)
        if sample is not None:
            per_repeat = ", ".join(f"{v:#.4g}" for v in sample.values)
            rows.append([metric.upper(), sample.describe(), str(sample.k), per_repeat or "-"])
    if m.kid_std is not None:
        rows.append(["KID spread over subsets", _num(m.kid_std), "-", f"{m.kid_subsets} subsets"])
    if m.isc_mean is not None:
        rows.append(
            ["IS", f"{_num(m.isc_mean)} ± {_num(m.isc_std, 2)} (std over splits)", "-", "-"]
        )
    rows += beside_fid_rows(m)
    return Section(
        "metrics",
        "Metrics and their noise",
        [
            Text(
                f"{m.repeats} x {m.num_images} samples vs {m.num_reference_images} held-out "
                f"images; {noise}."
            ),
            Table(["metric", "mean ± std", "k", "per repeat"], rows),
            *beside_fid_notes(m),
        ],
    )


def _spread(values: list[float]) -> tuple[str, str, str]:
    """(mean ± std, k, per repeat) of per-repeat values, as the FID row writes them."""
    mean = sum(values) / len(values)
    std = (
        (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        if len(values) > 1
        else None
    )
    return (
        with_noise(mean, std, len(values)),
        str(len(values)),
        ", ".join(f"{v:#.4g}" for v in values),
    )


def beside_fid_rows(m: Metrics) -> list[list[str]]:
    """Precision, recall, the memorized share and FD-DINOv2 (README: Metrics beside FID)."""
    named = [
        ("precision (realistic samples)", m.precisions),
        ("recall (data covered)", m.recalls),
        ("memorized share", m.memorized_shares),
        ("FD-DINOv2", m.fd_dinov2s),
    ]
    return [[name, *_spread(values)] for name, values in named if values]


def beside_fid_notes(m: Metrics) -> list[Text]:
    """How to read the memorized share, and the metrics skipped (one line each)."""
    notes = [Text(line + ".") for line in m.skipped]
    if m.memorized_share is not None and m.memorization_quantile is not None:
        notes.append(
            Text(
                f"Memorized share: samples nearer the training set ({m.num_training_images} "
                f"training images) than the nearest {m.memorization_quantile:.0%} of held-out "
                f"images are (distance < {_num(m.memorization_threshold)} in feature space); a "
                f"model that does not memorize scores about {m.memorization_quantile:.0%}, one "
                "that copies its training images near 100 %."
            )
        )
    return notes


def samples_section(grid: bytes | None) -> Section:
    """The sample grid (the first images of the first repeat): `grid.png`."""
    return Section(
        "samples", "Samples", [Image("grid", grid, "sample grid", "no sample grid was written")]
    )


def settings_section(m: Metrics) -> Section:
    sc = m.sampling
    seeds = ", ".join(f"{a}..{b - 1}" for a, b in m.seed_ranges) or (
        f"{sc.seed_start}..{sc.seed_start + m.num_images - 1}"
    )
    rows = [
        ["sampler", f"{sc.sampler}, {sc.steps} steps, {sc.spacing} spacing, eta {sc.eta:g}"],
        ["guidance scale", f"{sc.guidance_scale:g}"],
        ["weights", m.weights],
        ["images", f"{m.repeats} x {m.num_images} (seeds {seeds})"],
        ["held-out images", str(m.num_reference_images)],
        ["reference statistics", str(m.reference_stats_key)],
    ]
    if m.kid_subsets is not None:
        rows.append(["KID subsets", f"{m.kid_subsets} of {m.kid_subset_size} images"])
    rows += [
        ["dataset fingerprint", m.dataset_fingerprint],
        ["extractor", f"{m.extractor.label} (weights sha256 {m.extractor.weights_sha256})"],
        ["checkpoint", f"{m.checkpoint_key} (step {m.checkpoint_step})"],
        ["evaluated", m.created],
    ]
    if m.provenance is not None:
        p = m.provenance
        commit = p.git_commit or "unknown (not a git checkout)"
        rows += [
            ["code", f"diffusion-pipeline {p.package_version}, commit {commit}"],
            ["libraries", f"torch {p.torch}, torch-fidelity {p.torch_fidelity}"],
            ["device", p.device],
        ]
    return Section("settings", "Evaluation settings", [Table(["setting", "value"], rows)])


def document(m: Metrics, grid: bytes | None) -> Document:
    """The evaluation's own report (report.md beside its metrics.json and grid.png)."""
    return Document(
        f"Sample evaluation: run {m.run_id}, step {m.checkpoint_step}",
        warnings(m),
        [metrics_section(m), samples_section(grid), settings_section(m)],
    )
