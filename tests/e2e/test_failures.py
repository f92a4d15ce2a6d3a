"""Failures as a user meets them at the command line: checked before any service starts, reported
once in one clear message whatever layer raised them, and nothing left running or lying around
after a run ends or is killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tasks import layout
from tasks.config import load_config
from tasks.records import Checkpoint
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.loop import TrainJob, run_training
from tests.support import procs
from tests.support.config import tiny_overrides
from tests.support.paths import REPO
from tests.support.training import assert_same_training_state, final_state

pytestmark = pytest.mark.slow
DIFFPIPE = str(Path(sys.executable).parent / "diffpipe")
SMALL = tiny_overrides(
    {
        "data": {"max_images": 200, "samples_per_shard": 50},
        "train": {"workers": 1},
        "ray": {"num_cpus": 2},
    }
)


@pytest.fixture
def tmpdir_short():
    """A temp folder of its own for the run (to see what it leaves), with a short path: Ray's
    socket paths below TMPDIR must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dpt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(tmp_path: Path, tmpdir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect")}
    return env | ({"TMPDIR": str(tmpdir)} if tmpdir else {})


def _run(
    args: list[str], tmp_path: Path, timeout: float = 300, tmpdir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DIFFPIPE, *args],
        cwd=REPO,
        env=_env(tmp_path, tmpdir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_what_can_be_checked_early_fails_in_seconds(tmp_path, s3_endpoint):
    cases = [
        (
            # the default network's attention level (4 px) exists at digits' 8 px, not at 28 px
            [
                "nightly",
                "data.dataset=mnist",
                "model.attention_resolutions=[]",
                f"data.root={tmp_path / 'no-such'}",
            ],
            "no-such",
        ),
        (["nightly", "data.dataset=mnist"], "model.attention_resolutions"),  # refused, too
        (
            [
                "nightly",
                "storage.root=s3://no-such-bucket/p",
                f"storage.endpoint_url={s3_endpoint}",
            ],
            "bucket 'no-such-bucket'",
        ),
        (["sample", f"storage.root={tmp_path / 'empty'}"], "has no checkpoint yet"),
        (["train", "train.lr=-1"], "train.lr"),
    ]
    for args, expected in cases:
        run = _run(args, tmp_path, timeout=60)  # a guard against a hang, not a measure
        assert run.returncode == 2, (args, run.stderr[-2000:])
        assert expected in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr and "Starting temporary server" not in run.stderr


def test_a_failure_inside_a_ray_worker_is_one_clear_message(tmp_path):
    store_root = tmp_path / "store"
    overrides = [f"storage.root={store_root}", *SMALL, "train.steps=2", "train.checkpoint_every=2"]
    cfg = load_config(None, overrides)
    store = Store(cfg.storage)
    manifest = shard_dataset(cfg.data, store).manifest
    first = run_training(TrainJob(config=cfg, target_step=2, manifest=manifest)).checkpoint
    data = bytearray(store.read_bytes(first.key))
    data[len(data) // 2] ^= 0xFF  # damaged after it was written
    store.write_bytes(first.key, bytes(data))

    run = _run(["train", *overrides, "train.steps=4"], tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    message = "does not match its recorded sha256"
    final = [line for line in run.stderr.splitlines() if line.startswith("diffpipe train:")]
    assert len(final) == 1 and message in final[0], run.stderr[-3000:]
    assert run.stderr.count(message) == 1, run.stderr[-6000:]
    assert "Traceback" not in run.stderr, run.stderr[-6000:]
    lines = run.stderr.splitlines()
    assert "with -v" in lines[lines.index(final[0]) + 1]
    verbose = _run(["train", *overrides, "train.steps=4", "-v"], tmp_path)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    # Failed once, not train.max_failures + 1 times: a damaged checkpoint is not worth a restart.
    assert "Error count: 1" in verbose.stderr, verbose.stderr[-6000:]
    assert "Error count: 2" not in verbose.stderr, verbose.stderr[-6000:]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_a_killed_run_leaves_nothing_behind_and_resumes(tmp_path, tmpdir_short):
    # 200 steps, the first checkpoint at 10: the kill lands ~190 steps before the end, and the
    # resumed run and the uninterrupted one each train at most 200 steps.
    store_root = tmp_path / "store"
    args = [
        "train",
        f"storage.root={store_root}",
        *SMALL,
        "train.steps=200",
        "train.checkpoint_every=10",
        "train.log_every=20",
    ]
    proc = subprocess.Popen(
        [DIFFPIPE, *args],
        cwd=REPO,
        env=_env(tmp_path, tmpdir_short),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = store_root / layout.latest_checkpoint("nightly")
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latest.exists() and proc.poll() is None, "training never reached its first checkpoint"
    started = set(procs.below(proc.pid))
    assert started, "the run started no processes (Prefect server, Ray)"
    # Ray's session folder lies in the run's own temporary folder, not in $TMPDIR/ray.
    assert list(tmpdir_short.glob(f"diffpipe-{proc.pid}-ray-*/session_*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    deadline = time.monotonic() + 60
    while any(procs.running(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in started if procs.running(p)], "processes of the killed run still run"
    assert not list(tmpdir_short.glob(f"diffpipe-{proc.pid}-*"))
    assert not (tmpdir_short / "ray").exists()

    cfg = load_config(None, args[1:])
    store = Store(cfg.storage)
    killed_at = Checkpoint.latest(store, "nightly")
    assert killed_at is not None and 0 < killed_at.step < 200
    again = _run(args, tmp_path, tmpdir=tmpdir_short)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(step 200)" in again.stdout
    assert f"resuming run nightly from step {killed_at.step} to 200" in again.stderr
    assert "step 200/200" in again.stderr  # the driver shows rank 0's progress
    deadline = time.monotonic() + 30  # the watchdog tidies up once the run has ended
    while list(tmpdir_short.glob("diffpipe-*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not list(tmpdir_short.glob("diffpipe-*")) and not (tmpdir_short / "ray").exists()

    # Bitwise the run that was never killed (one worker of one thread, as train.workers=1 and
    # train.cpus_per_worker=1 run it under Ray).
    straight = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_id": "straight"})})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = shard_dataset(cfg.data, store).manifest
        run_training(TrainJob(config=straight, target_step=200, manifest=manifest))
    finally:
        torch.set_num_threads(threads)
    a, b = (final_state(store, run_id) for run_id in ("straight", "nightly"))
    assert a["step"] == b["step"] == 200
    assert_same_training_state(a, b)
