"""The capacity model's pure parts (`benchmarks.capacity`): the fit of fixed and per-unit costs,
the prediction it makes for more workers, and the projection onto the cluster config."""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml

from benchmarks.capacity import (
    CLUSTER,
    PIXEL_GROWTH,
    QUANTITIES,
    STAGES,
    Line,
    Measured,
    Rates,
    error,
    first_limits,
    fit_line,
    fit_stages,
    image_bytes_scale,
    predict,
    project,
    totals,
    unit_of,
)


def test_fit_line_separates_fixed_from_per_unit() -> None:
    line = fit_line(100, 30.0 + 0.5 * 100, 200, 30.0 + 0.5 * 200)
    assert line.fixed == pytest.approx(30.0)
    assert line.per_unit == pytest.approx(0.5)
    assert line.at(1000) == pytest.approx(530.0)


def test_fit_line_needs_two_sizes() -> None:
    with pytest.raises(ValueError, match="two sizes"):
        fit_line(100, 1.0, 100, 2.0)


def _units(images: float, steps: float) -> dict[str, dict[str, float]]:
    return {
        "shard": {"images": images},
        "train": {"images": images, "steps": steps},
        "sample": {"images": images},
        "evaluate": {"images": images},
    }


def _night(units: dict[str, dict[str, float]], workers: int) -> dict[str, dict[str, float]]:
    """A synthetic night whose every quantity is 10 + 2 x units (the wall's per-unit part split
    among the workers)."""
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        out[stage] = {}
        for q in QUANTITIES:
            x = units[stage][unit_of(stage, q)]
            out[stage][q] = 10 + 2 * x / (workers if q == "wall_s" else 1)
    return out


def test_prediction_of_more_workers_from_two_sizes_is_exact_on_a_linear_night() -> None:
    a, b = _units(100, 10), _units(200, 20)
    model = fit_stages((a, b), (_night(a, 1), _night(b, 1)))
    # Two data-parallel workers: twice the images trained per step, the same steps written.
    c = _units(200, 20)
    c["train"]["images"] = 400
    pred = predict(model, c, 2)
    meas = _night(c, 2)
    for stage in STAGES:
        p, m = totals(pred[stage]), totals(meas[stage])
        for q in ("wall_s", "device_s", "requests", "bytes"):
            assert error(p[q], m[q]) == pytest.approx(0.0, abs=1e-12), (stage, q)


def test_training_writes_follow_steps_and_reads_follow_images() -> None:
    assert unit_of("train", "bytes_written") == "steps"
    assert unit_of("train", "put") == "steps"
    assert unit_of("train", "list") == "steps"  # pruning old checkpoints
    assert unit_of("train", "get") == "images"
    assert unit_of("sample", "bytes_written") == "images"


def test_image_bytes_grow_by_the_raw_pixels_over_a_shards_bytes_per_image() -> None:
    assert PIXEL_GROWTH == 3072 - 64
    assert image_bytes_scale(3008.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="bytes per image"):
        image_bytes_scale(0.0)


def test_error_is_relative_and_none_without_a_measurement() -> None:
    assert error(110.0, 100.0) == pytest.approx(0.1)
    assert error(1.0, 0.0) is None


def _measured(get_per_image: float = 0.01, put_per_image: float = 0.02) -> Measured:
    zero = Line(0.0, 0.0)
    model = {stage: dict.fromkeys(QUANTITIES, zero) for stage in STAGES}
    model["train"]["get"] = Line(5.0, get_per_image)  # a fixed part the projection must not scale
    model["train"]["bytes_read"] = Line(1e6, 100.0)
    # Per step at a checkpoint every 50 steps: 2 PUTs (the .pt, latest.json), 1 listing (pruning).
    model["train"]["put"] = Line(1.0, 2 / 50)
    model["train"]["list"] = Line(1.0, 1 / 50)
    model["sample"]["put"] = Line(3.0, put_per_image)
    model["sample"]["bytes_written"] = Line(0.0, 64.0)
    return Measured(
        model=model,
        images_per_task=16,
        driver=Line(500.0, 1.0),
        driver_mb_per_worker=2.0,
        checkpoint_bytes=500_000_000,
        checkpoint_local_s=1.0,
        checkpoint_every=50,
        image_bytes_scale=SCALE,
    )


SCALE = image_bytes_scale(2000.0)
RATES = Rates(train_ips=100.0, score_ips=1000.0, checkpoint_Bps=1e8, get_rps=5500, put_rps=3500)


def _cluster() -> dict[str, Any]:
    cluster: dict[str, Any] = yaml.safe_load(CLUSTER.read_text())
    return cluster


def test_projection_of_the_cluster_config() -> None:
    cluster, m = _cluster(), _measured()
    p1, p64 = project(cluster, 1, m, RATES), project(cluster, 64, m, RATES)
    tr = cluster["train"]
    writes = tr["steps_per_night"] // tr["checkpoint_every"]
    stall = 500_000_000 / 1e8 + 1.0
    assert p1["writes"] == writes
    assert p1["stall_s"] == pytest.approx(stall)
    assert p1["train_s"] == pytest.approx(
        tr["steps_per_night"] * tr["batch_size"] / 100 + writes * stall
    )
    # The per-GPU batch is fixed: more GPUs train more images in the same time.
    assert p64["train_s"] == pytest.approx(p1["train_s"])
    assert p64["train_images"] == 64 * p1["train_images"]
    # Training's reads scale with the GPUs, from the per-image part only; its checkpoints do not:
    # a multipart upload (create, 10 parts of 50 MiB, complete) + latest.json, 1 listing each.
    assert p64["stages"]["train"]["get_rps"] == pytest.approx(
        0.01 * 100 * 64 + writes / p1["train_s"]
    )
    assert p64["stages"]["train"]["put_rps"] == pytest.approx(writes * 13 / p1["train_s"])
    assert p64["stages"]["train"]["Bps"] == pytest.approx(
        100 * SCALE * 100 * 64 + writes * 500_000_000 / p1["train_s"]
    )
    tasks = math.ceil(cluster["sample"]["num_images"] * cluster["evaluate"]["repeats"] / 2500)
    assert p64["tasks"] == tasks == p64["shards"] == p64["features"]
    assert p64["busy_gpus"] == min(64, tasks)
    # Sampling's requests are per task: 0.02 per image at 16 images a task = 0.32 per task.
    sample_ips = 100 * 3 / cluster["sample"]["steps"]
    assert p1["stages"]["sample"]["put_rps"] == pytest.approx(0.02 * 16 / 2500 * sample_ips)
    assert p1["stages"]["sample"]["Bps"] == pytest.approx(64 * SCALE * sample_ips)
    assert p64["driver_mb"] == pytest.approx(500 + tasks + 2.0 * (min(64, tasks) - 1))


def test_first_limit_is_the_smallest_crossing() -> None:
    cluster = _cluster()
    # 0.01 GET per image at 100 img/s a GPU: 1 GET/s per GPU, so 5,500 GPUs; tasks come first.
    limits = first_limits(cluster, _measured(), RATES)
    assert "seed-range tasks" in limits[0][1]
    assert [n for n, _ in limits] == sorted(n for n, _ in limits)
    # 1 GET per image: 100/s per GPU, one prefix's 5,500/s passes at 55 GPUs, before the tasks.
    limits = first_limits(cluster, _measured(get_per_image=1.0), RATES)
    assert limits[0] == (55, "training's GET/HEAD/LIST requests pass S3's 5,500/s per prefix")
