"""Sweeps over training settings on the tiny pipeline, run as a user runs them (`diffpipe sweep`):
four trials (two learning rates x two training seeds) under ASHA, each an ordinary run trained in
two segments and scored after each. While it runs, the Ray Train worker of a trial's second
segment is SIGKILLed (the trial resumes from its checkpoint and ends as an uninterrupted run), then
the driver itself (the same command resumes the sweep without rerunning its finished trials and
confirms the winner at full n). Apart, in process: a small budget stops a sweep and says where."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tasks import layout
from tasks.config import StorageConfig
from tasks.records import Checkpoint, SweepResult, SweepTrial
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.sweep.spec import plan_trials, read_spec
from tasks.train.loop import TrainJob, run_training
from tests.support import procs
from tests.support.config import tiny_settings
from tests.support.paths import REPO
from tests.support.training import assert_same_training_state, final_state

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


def _cli(path: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "diffpipe"), "sweep", "-c", str(path)]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    return env


def _train_workers() -> dict[int, str]:
    """pid -> Ray Train run name (`<run_id>-<target step>`, tasks/train/stage.py) of each Ray Train
    worker below this test (not its data-loading children, which share its title). Ray Train makes
    each worker work in a folder named after its run (RAY_CHDIR_TO_TRIAL_DIR, on by default)."""
    pids = procs.outermost([pid for pid, cmd in procs.below().items() if b"RayTrainWorker" in cmd])
    names = {}
    for pid in pids:
        try:
            names[pid] = Path(os.readlink(f"/proc/{pid}/cwd")).name
        except OSError:  # gone, or not yet in its run's folder
            continue
    return names


def _kill_a_second_segments_worker(store: Store) -> tuple[str, Checkpoint] | None:
    """SIGKILL the Ray Train worker of a trial training its second segment (steps 2 to 4) while
    the trial's checkpoint of step 2 is its newest; the trial's id and that checkpoint, or None
    when no such worker runs now."""
    for pid, name in _train_workers().items():
        found = re.fullmatch(r"lr-(t\d+)-4", name)
        if found is None:
            continue
        latest = Checkpoint.latest(store, f"lr-{found[1]}")
        if latest is not None and latest.step == 2:
            os.kill(pid, signal.SIGKILL)
            return found[1], latest
    return None


def _unchanged(store: Store, key: str) -> tuple[bytes, int]:
    """An object's bytes and modification time: the same pair later means nobody wrote it again."""
    return store.read_bytes(key), os.stat(store.path(key)).st_mtime_ns


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the Ray processes through /proc")
def test_a_sweep_survives_a_killed_trial_worker_and_a_killed_driver(tmp_path):
    root = tmp_path / "store"
    path = _sweep_file(
        tmp_path,
        root,
        "lr",
        grid={"train.lr": [1e-3, 3e-3]},
        seeds=2,
        scheduler={"kind": "asha", "grace_period": 2, "reduction_factor": 2},
    )
    store = Store(StorageConfig(root=str(root)))
    prefix = layout.sweep_prefix("lr")
    started = time.perf_counter()
    first = subprocess.Popen(
        _cli(path),
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed: tuple[str, Checkpoint] | None = None
    resumed_from: tuple[bytes, int] | None = None
    deadline = time.monotonic() + 600
    try:
        while True:
            assert first.poll() is None, (
                f"the sweep ended before it could be killed (a trial worker killed: {killed})"
            )
            assert time.monotonic() < deadline, (
                f"no kill in 600 s (a trial worker killed: {killed})"
            )
            if killed is None:
                killed = _kill_a_second_segments_worker(store)
                if killed is not None:
                    resumed_from = _unchanged(store, killed[1].key)
            else:
                # The trial of the killed worker finished: now the driver.
                trial = SweepTrial.read(store, layout.sweep_trial(prefix, killed[0]))
                if trial.step == trial.target_step:
                    os.kill(first.pid, signal.SIGKILL)
                    first.wait()
                    break
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert killed is not None
    victim_id, checkpoint = killed
    before = {
        t: SweepTrial.read_or_none(store, layout.sweep_trial(prefix, t))
        for t in ("t00", "t01", "t02", "t03")
    }
    finished_before = {
        t: _unchanged(store, layout.latest_checkpoint(r.run_id))
        for t, r in before.items()
        if r is not None and r.step == r.target_step
    }
    assert victim_id in finished_before

    run = subprocess.run(
        _cli(path), cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    print(f"\nsweep of 4 trials, killed twice: {time.perf_counter() - started:.1f} s")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "resuming sweep lr from" in run.stderr, run.stderr[-3000:]
    result = SweepResult.read(store, layout.sweep_record(prefix))
    assert f"hand it to the nightly: {result.handoff}" in run.stdout, run.stdout[-2000:]
    assert f"report: {result.report_url}" in run.stdout

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
        assert t.run_id == f"lr-{t.trial_id}"
        # Each trial is an ordinary run: its latest checkpoint is where it ended.
        assert Checkpoint.require_latest(store, t.run_id).step == t.step
        assert [s.step for s in t.segments] == ([2, 4] if o.status == "finished" else [2])
        assert all(len(s.values) == 2 and s.num_images == 4 for s in t.segments)
        assert SweepTrial.read(store, layout.sweep_trial(prefix, t.trial_id)) == t
        earlier = before[t.trial_id]
        if t.trial_id in finished_before:
            # Finished before the driver's kill: neither trained nor scored again.
            assert t == earlier
            assert t.starts == 1 or t.trial_id == victim_id  # the victim's: below
            latest = layout.latest_checkpoint(t.run_id)
            assert _unchanged(store, latest) == finished_before[t.trial_id]
        elif earlier is None:
            assert t.starts == 1  # first started by the resumed sweep
        else:
            # Interrupted by the driver's kill (or stopped by ASHA before it): the segments it
            # had scored are kept, not run again.
            assert t.starts in (1, 2) and t.segments[: len(earlier.segments)] == earlier.segments
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
    markdown = store.read_bytes(layout.sweep_report(prefix)).decode()
    for o in result.trials:
        assert f"| {o.trial.trial_id} |" in markdown
    assert "Hand it to the nightly: diffpipe nightly" in markdown
    assert store.read_bytes(layout.sweep_figure(prefix)).startswith(b"\x89PNG")

    # The trial whose worker was killed resumed from the step-2 checkpoint, not from step 0 (a run
    # from 0 writes that checkpoint again), and ended where an uninterrupted run does. Ray Train
    # restarts the worker group inside the segment (the trial goes on: one start); a worker lost
    # while Ray Train still sets the group up is its ControllerError, not retried by it, and Tune
    # restarts the trial (trial_max_failures: two starts), which skips its scored segment.
    victim = next(o for o in result.trials if o.trial.trial_id == victim_id)
    assert victim.status == "finished" and victim.trial.starts in (1, 2)
    assert checkpoint.step == 2 and _unchanged(store, checkpoint.key) == resumed_from
    plan = next(p for p in plan_trials(read_spec(path)) if p.trial_id == victim_id)
    direct = plan.config.model_copy(
        update={"train": plan.config.train.model_copy(update={"run_id": "direct"})}
    )
    manifest = shard_dataset(direct.data, store).manifest  # the sweep's shards, reused
    threads = torch.get_num_threads()
    torch.set_num_threads(int(direct.train.cpus_per_worker))  # as a Ray Train worker does
    try:
        run_training(TrainJob(config=direct, target_step=4, manifest=manifest))
    finally:
        torch.set_num_threads(threads)
    assert_same_training_state(final_state(store, plan.run_id), final_state(store, "direct"))


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
    prefix = layout.sweep_prefix("small")
    assert SweepResult.read(store, layout.sweep_record(prefix)) == result
    markdown = store.read_bytes(layout.sweep_report(prefix)).decode()
    assert f"Stopped by the budget: {result.budget_note}" in markdown
