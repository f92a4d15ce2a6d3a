"""The sampler sweep on a tiny trained model: a 2 x 2 grid (ddim / dpmpp_2m x 4 / 8 steps) sampled
as one job (one weights load per actor), each setting's set the very set a single `sample` run
writes; then the flow and the CLI: one feature pool, the reference statistics computed once and
reused, and a report with every setting and the one chosen."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks import layout
from tasks.config import StorageConfig
from tasks.records import SamplerChoice, SampleSet
from tasks.sample.grid import grid_configs
from tasks.sample.stage import sample_grid, sample_images
from tasks.storage import Store
from tests.support.config import tiny_config, tiny_overrides
from tests.support.paths import REPO
from tests.support.training import shard_and_train

pytestmark = pytest.mark.slow  # a Ray actor pool, Prefect's test harness, InceptionV3 on CPU

# Two seed ranges (evaluate.repeats) of 8 images, in shards of 4, on two sampling actors.
SWEEP = {
    "sample": {"num_images": 8, "images_per_task": 4, "batch_size": 4, "workers": 2},
    "evaluate": {"repeats": 2, "metrics": ["fid"], "grid_images": 4},
}
GRID = [{"sampler": s, "steps": n} for s in ("ddim", "dpmpp_2m") for n in (4, 8)]
STAMP = "20261206T000000Z"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = Store(StorageConfig(root=str(tmp_path_factory.mktemp("store"))))
    cfg = tiny_config(store.config.root, SWEEP)
    _, ckpt = shard_and_train(store, cfg)
    return store, cfg, ckpt


def _files(store: Store, s: SampleSet) -> dict[str, str]:
    """sha256 of every shard and receipt of a set, and of its weights file."""
    keys = [
        s.weights_key,
        *(k for sh in s.shards for k in (sh.key, sh.key[: -len(".tar")] + ".json")),
    ]
    return {k: store.sha256(k) for k in keys}


def test_a_sweep_is_one_job_with_one_weights_load_per_actor(trained, ray_cluster):
    store, cfg, ckpt = trained
    configs = grid_configs(cfg.sample, GRID)
    # What a single `diffpipe sample` with the first setting writes, then removed.
    alone = sample_images(store, configs[0], cfg.ray, ckpt, repeats=2)
    written = _files(store, alone)
    for key in store.list(alone.prefix):
        store.delete(key)

    started = time.perf_counter()
    grid = sample_grid(store, configs, cfg.ray, ckpt, repeats=2)
    print(f"\n2 x 2 grid, 4 x 16 images on 2 actors: {time.perf_counter() - started:.1f} s")
    # 16 seed ranges (4 settings x 2 repeats x 2 shards) on 2 actors: each loaded the weights once.
    assert grid.weight_loads == [1, 1]
    assert [s.config for s in grid.sets] == configs
    assert len({s.name for s in grid.sets}) == 4
    first = grid.sets[0]
    assert first.key == alone.key and first.shards == alone.shards
    assert _files(store, first) == written  # the same objects, byte for byte
    for s in grid.sets:
        assert SampleSet.read(store, s.key) == s
        assert s.seed_ranges() == [(0, 8), (8, 16)] and len(s.shards) == 4
    # A single run with another setting of the grid finds its set complete and reuses it.
    assert sample_images(store, configs[3], cfg.ray, ckpt, repeats=2) == grid.sets[3]
    again = sample_grid(store, configs, cfg.ray, ckpt, repeats=2)
    assert again.sets == grid.sets and again.weight_loads == []  # nothing sampled, no actor


@contextmanager
def _reference_logs() -> Iterator[list[str]]:
    """The reference statistics' log lines while the block runs (a handler on their own logger:
    Prefect reconfigures the root logger's handlers when a flow starts)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("tasks.evaluate.reference"), Keep()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _computed_and_cached(lines: list[str]) -> tuple[int, int]:
    """How many times the reference statistics were computed, and read from the cache."""
    return (
        sum(m.startswith("reference stats of") and "written to" in m for m in lines),
        sum(m.startswith("reference stats from cache") for m in lines),
    )


def test_the_flow_scores_every_setting_once_against_one_reference(
    trained, ray_cluster, prefect_harness
):
    from flows.choose import sampler_flow

    store, _, ckpt = trained
    overrides = [f"storage.root={store.config.root}", *tiny_overrides(SWEEP)]
    started = time.perf_counter()
    with _reference_logs() as lines:
        choice = sampler_flow(overrides=overrides, grid=GRID, stamp=STAMP)
    print(f"\nsampler flow, 4 settings: {time.perf_counter() - started:.1f} s")

    # The held-out statistics were computed for the first set and read back for the other three.
    assert _computed_and_cached(lines) == (1, 3)
    metrics_keys = [s.metrics_key for s in choice.settings]
    assert len(set(metrics_keys)) == 4 and all(store.exists(k) for k in metrics_keys)

    assert choice.step == ckpt.step and choice.repeats == 2 and choice.num_images == 8
    assert {(s.sampler, s.steps) for s in choice.settings} == {
        (g["sampler"], g["steps"]) for g in GRID
    }
    assert [s.nfe for s in choice.settings] == [4, 8, 4, 8]
    assert all(len(s.values) == 2 for s in choice.settings)
    assert sum(s.chosen for s in choice.settings) == 1 and sum(s.best for s in choice.settings) == 1
    assert choice.chosen.within_noise and choice.best.within_noise
    assert choice.chosen.nfe <= choice.best.nfe

    prefix = layout.sampler_choice_prefix(ckpt.run_id, STAMP)
    assert SamplerChoice.read(store, layout.sampler_choice_record(prefix)) == choice
    markdown = store.read_bytes(layout.sampler_choice_report(prefix)).decode()
    html = store.read_bytes(layout.sampler_choice_report_html(prefix)).decode()
    for s in choice.settings:
        assert f"| {s.name} | {s.nfe} |" in markdown and s.name in html
    assert f"Chosen: {choice.chosen.name}" in markdown
    assert store.read_bytes(layout.sampler_choice_figure(prefix)).startswith(b"\x89PNG")


def test_the_cli_prints_the_choice_and_the_command_that_uses_it(trained, tmp_path):
    """Two settings of the grid: sampled as one job, scored against one reference."""
    store, _, _ = trained
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    cmd = [
        str(Path(sys.executable).parent / "diffpipe"),
        "samplers",
        f"storage.root={store.config.root}",
        *tiny_overrides(SWEEP),
        "ray.num_cpus=2",
        "--samplers",
        "ddim",
        "--steps",
        "4,8",
    ]
    started = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(f"\ndiffpipe samplers, 2 settings: {time.perf_counter() - started:.1f} s")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    out = run.stdout
    assert re.search(r"^sampler sweep of run 'nightly', step \d+: 2 settings", out, re.M), out
    assert len(re.findall(r"^  ddim, [48] steps, trailing +[48] NFE  FID ", out, re.M)) == 2
    chosen = re.search(r"^chosen: (\S+), (\d+) steps, trailing \((\d+) NFE\)", out, re.M)
    use = re.search(
        r"^use it: diffpipe nightly .*sample\.sampler=(\S+) sample\.steps=(\d+) ", out, re.M
    )
    report = re.search(r"^report: file://(\S+/report\.html)$", out, re.M)
    assert chosen and use and report, out
    assert use.groups() == chosen.groups()[:2]
    assert Path(report.group(1)).is_file()
    # the statistics computed at most once (the flow test, run first, leaves them cached)
    assert _computed_and_cached(
        re.findall(r"tasks\.evaluate\.reference: (.*)$", run.stderr, re.M)
    ) in (
        (1, 1),
        (0, 2),
    ), run.stderr[-4000:]
