"""Sweeps over training settings on the tiny pipeline: four trials (two learning rates x two
training seeds) under ASHA, each an ordinary run trained in two segments and scored after each;
the winner confirmed at full n; a small budget stops the sweep and says so; and, through the CLI,
a SIGKILLed driver is resumed by the same command without rerunning the finished trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks import layout
from tasks.config import StorageConfig
from tasks.records import Checkpoint, SweepResult, SweepTrial
from tasks.storage import Store
from tests.support.config import tiny_settings
from tests.support.paths import REPO

pytestmark = pytest.mark.slow  # Ray Tune trials of Ray Train runs, InceptionV3 on CPU

# Four steps in two segments of two; each checkpoint scored on 2 seed ranges of 4 images; the
# winner confirmed on 2 ranges of 8.
SWEEP_SIZE = {
    "train": {"steps": 4, "checkpoint_every": 2, "workers": 1, "warmup_steps": 0},
    "sample": {"num_images": 8, "workers": 1},
    "evaluate": {
        "repeats": 2,
        "metrics": ["fid"],
        "grid_images": 4,
        "score_images": 4,
        "score_repeats": 2,
        "workers": 1,
    },
}


def _sweep_file(folder: Path, root: Path, name: str, **fields: Any) -> Path:
    """A sweep YAML over the tiny pipeline, its store at `root`."""
    overrides = {
        f"{section}.{field}": value
        for section, values in tiny_settings(SWEEP_SIZE).items()
        for field, value in values.items()
    }
    overrides["storage.root"] = str(root)
    overrides["ray.num_cpus"] = 2  # the CLI's own local cluster
    spec = {
        "name": name,
        "base": {"overrides": overrides},
        "segment_steps": 2,
        "max_concurrent": 2,
        **fields,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_tiny_sweep_runs_four_trials_and_confirms_the_winner(
    tmp_path, ray_cluster, prefect_harness
):
    from flows.sweep import sweep_flow

    store = Store(StorageConfig(root=str(tmp_path / "store")))
    path = _sweep_file(
        tmp_path,
        tmp_path / "store",
        "lr",
        grid={"train.lr": [1e-3, 3e-3]},
        seeds=2,
        scheduler={"kind": "asha", "grace_period": 2, "reduction_factor": 2},
    )
    started = time.perf_counter()
    result = sweep_flow(sweep_path=str(path))
    print(f"\ntiny sweep, 4 trials: {time.perf_counter() - started:.1f} s")

    assert [o.trial.trial_id for o in result.trials] == ["t00", "t01", "t02", "t03"]
    assert {(o.trial.settings["train.lr"], o.trial.seed) for o in result.trials} == {
        (1e-3, 0),
        (1e-3, 1),
        (3e-3, 0),
        (3e-3, 1),
    }
    for o in result.trials:
        t = o.trial
        assert o.status in ("finished", "stopped"), o
        assert t.starts == 1 and t.run_id == f"lr-{t.trial_id}"
        # Each trial is an ordinary run: its latest checkpoint is where it ended.
        assert Checkpoint.require_latest(store, t.run_id).step == t.step
        assert [s.step for s in t.segments] == ([2, 4] if o.status == "finished" else [2])
        assert all(len(s.values) == 2 and s.num_images == 4 for s in t.segments)
        assert SweepTrial.read(store, layout.sweep_trial("sweeps/lr", t.trial_id)) == t
    assert sum(o.status == "finished" for o in result.trials) >= 1
    assert result.winner is not None
    winner = next(o for o in result.trials if o.trial.trial_id == result.winner)
    assert winner.status == "finished"
    c = result.confirmation
    assert c is not None and c.run_id == winner.trial.run_id and c.checkpoint_step == 4
    assert c.repeats == 2 and c.num_images == 8  # full n, the evaluation's own seed ranges
    assert result.handoff and f"train.run_id={winner.trial.run_id}" in result.handoff
    assert len(result.spreads) == 2 and all(len(s.fids) == 2 for s in result.spreads)
    assert result.spent_device_s == pytest.approx(sum(o.trial.device_s for o in result.trials))

    prefix = layout.sweep_prefix("lr")
    assert SweepResult.read(store, layout.sweep_record(prefix)) == result
    markdown = store.read_bytes(layout.sweep_report(prefix)).decode()
    for o in result.trials:
        assert f"| {o.trial.trial_id} |" in markdown
    assert "Hand it to the nightly: diffpipe nightly" in markdown
    assert store.read_bytes(layout.sweep_figure(prefix)).startswith(b"\x89PNG")


def _cli(path: Path, tmp_path: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "diffpipe"), "sweep", "-c", str(path), "--no-confirm"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    return env


def test_a_small_budget_stops_the_sweep_and_says_where(
    tmp_path, ray_cluster, prefect_harness, capsys
):
    from flows.cli import _print_sweep
    from flows.sweep import sweep_flow

    path = _sweep_file(
        tmp_path,
        tmp_path / "store",
        "small",
        grid={"train.lr": [1e-3, 2e-3, 3e-3]},
        budget_device_s=1,
        scheduler={"kind": "none"},
    )
    result = sweep_flow(sweep_path=str(path), confirm=False)
    # The first segment runs alone to measure what a segment costs; none starts after it.
    scored = [o for o in result.trials if o.trial.segments]
    assert len(scored) == 1 and len(scored[0].trial.segments) == 1
    assert sorted(o.status for o in result.trials) == ["budget", "not started", "not started"]
    assert result.winner is None and result.spent_device_s == scored[0].trial.device_s
    assert result.budget_note is not None
    assert result.budget_note.startswith("budget 1 CPU-seconds: ")
    assert f"stopped {scored[0].trial.trial_id} at step 2" in result.budget_note
    _print_sweep(result)
    assert f"stopped by the budget: {result.budget_note}" in capsys.readouterr().out
    store = Store(StorageConfig(root=str(tmp_path / "store")))
    markdown = store.read_bytes(layout.sweep_report(layout.sweep_prefix("small"))).decode()
    assert f"Stopped by the budget: {result.budget_note}" in markdown


def test_a_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    root = tmp_path / "store"
    path = _sweep_file(
        tmp_path,
        root,
        "resume",
        grid={"train.lr": [1e-3, 3e-3]},
        scheduler={"kind": "none"},
        segment_steps=4,  # one segment a trial
        max_concurrent=1,
    )
    store = Store(StorageConfig(root=str(root)))
    first = subprocess.Popen(
        _cli(path, tmp_path),
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    key = layout.sweep_trial(layout.sweep_prefix("resume"), "t00")
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and first.poll() is None:
            t00 = SweepTrial.read_or_none(store, key) if store.exists(key) else None
            if t00 is not None and t00.step == t00.target_step:
                break
            time.sleep(0.5)
        assert first.poll() is None, "the sweep ended before it could be killed"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    done_before = SweepTrial.read(store, key)
    latest = layout.latest_checkpoint("resume-t00")
    checkpoint_before = (store.read_bytes(latest), os.stat(store.path(latest)).st_mtime_ns)

    run = subprocess.run(
        _cli(path, tmp_path),
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = SweepResult.read(store, layout.sweep_record(layout.sweep_prefix("resume")))
    assert [o.status for o in result.trials] == ["finished"] * 2
    t00 = next(o.trial for o in result.trials if o.trial.trial_id == "t00")
    # Finished before the kill: neither trained nor scored again.
    assert t00 == done_before and t00.starts == 1
    assert (store.read_bytes(latest), os.stat(store.path(latest)).st_mtime_ns) == checkpoint_before
    assert "resuming sweep resume from" in run.stderr, run.stderr[-3000:]
