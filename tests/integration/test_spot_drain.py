"""A spot drain survived: a real Ray cluster on this machine (a head and one worker node of one
CPU each, one training worker on each), the worker node drained for preemption with a deadline as
a cloud's reclaim notice does (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`), killed
once its deadline has passed, and a replacement node added, as an autoscaler would.

Rank 0 saves a just-in-time checkpoint at the first logging window after the notice (and at each
one until the node goes); the restarted group resumes from it, having lost at most one window of
steps, and the run ends bitwise equal to an uninterrupted one. The drain is a preemption to Ray
Train, not a failure: the run has `train.max_failures=0`, so a restart counted as a failure would
have ended it."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks import layout
from tasks.config import StorageConfig, load_config
from tasks.records import TrainHistory
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.loop import TrainJob, run_training
from tasks.train.stage import train
from tests.integration.test_node_loss import (
    NODE_LOSS,
    add_node,
    cluster_of_two,
    kill_node,
    wait_for,
)
from tests.support.config import LONGER_TRAINING, Settings, tiny_config, tiny_overrides
from tests.support.paths import REPO
from tests.support.training import assert_same_training_state, final_state

# 200 steps on 2 workers, one per node, a window every 10 (seconds of training on a quiet machine,
# so that a drain lands mid-run), with no checkpoint before the last step but those a drain asks
# for, and no restart for a failure.
DRAIN: Settings = {
    "data": NODE_LOSS["data"],
    "train": {**NODE_LOSS["train"], "steps": 200, "checkpoint_every": 200, "max_failures": 0},
}
LOG_EVERY = 10

DRIVER = textwrap.dedent(
    """
    import logging, sys
    from tasks.config import load_config
    from tasks.shard.stage import shard_dataset
    from tasks.storage import Store
    from tasks.train.stage import train

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = load_config(None, sys.argv[1:])
    store = Store(cfg.storage)
    result = train(cfg, store, shard_dataset(cfg.data, store).manifest)
    print("final step", result.checkpoint.step, file=sys.stderr, flush=True)
    """
)

# The driver's progress line of a logging window; Ray Train's controller naming the budget a
# restart is charged to; rank 0 at the notice and at its resumption (forwarded worker output).
WINDOW = re.compile(r"tasks.train.stage:step (\d+)/200 ")
CHARGED = re.compile(r"Source: (preemption|worker group|controller)")
NOTICED = re.compile(r"drained for preemption: checkpoint at step (\d+)")
RESUMED = re.compile(r"resuming run drained from step (\d+)")


def test_after_a_drain_notice_rank_0_saves_at_each_window_end(tmp_path):
    """The loop alone (world size 1, in this process): asked at each window's end until the first
    yes, then a checkpoint at each window's end."""
    store = Store(StorageConfig(root=str(tmp_path)))
    cfg = tiny_config(
        tmp_path, LONGER_TRAINING, {"train": {"steps": 12, "checkpoint_every": 12, "run_id": "r"}}
    )
    manifest = shard_dataset(cfg.data, store).manifest
    asked: list[int] = []
    saved: list[int] = []

    def draining() -> bool:
        asked.append(len(asked))
        return len(asked) == 2  # the notice is seen at the second window's end (step 6)

    run_training(
        TrainJob(config=cfg, target_step=12, manifest=manifest),
        draining=draining,
        saved=lambda checkpoint: saved.append(checkpoint.step),
    )
    assert len(asked) == 2 and saved == [6, 9, 12]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_a_drained_node_leaves_a_just_in_time_checkpoint_and_costs_no_failure(
    tmp_path, ray_cluster
):
    overrides = [
        f"storage.root={tmp_path / 'store'}",
        *tiny_overrides(DRAIN),
        "ray.worker_logs=true",
    ]
    store = Store(load_config(None, overrides).storage)
    with cluster_of_two() as cluster:
        worker = next(iter(cluster.worker_nodes))
        log = tmp_path / "driver.log"
        env = os.environ | {
            "RAY_ADDRESS": cluster.address,
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            # Ray Train looks for drains every 5 s and at its workers every 2 s: sooner here.
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.2",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        }
        with log.open("w") as out:
            driver = subprocess.Popen(
                [sys.executable, "-c", DRIVER, *overrides, "train.run_id=drained"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            # The notice comes while the group trains at its pace; its deadline leaves time for a
            # few windows (a window's time measured here, whatever the machine's load).
            def windows(n: int) -> float | None:
                return time.monotonic() if len(WINDOW.findall(log.read_text())) >= n else None

            first = wait_for("a first window", lambda: windows(1), driver, log)
            window_s = wait_for("a second window", lambda: windows(2), driver, log) - first
            deadline_s = max(2, math.ceil(3 * window_s))
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "drain-node",
                    f"--address={cluster.address}",
                    f"--node-id={worker.node_id}",
                    "--reason=DRAIN_NODE_REASON_PREEMPTION",
                    "--reason-message=spot instance reclaimed",
                    f"--deadline-remaining-seconds={deadline_s}",
                ],
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )
            # At the deadline Ray Train restarts the group, and the node goes (its raylet leaves
            # once idle; what is left of it is killed); a replacement comes.
            wait_for("the restart", lambda: CHARGED.search(log.read_text()), driver, log)
            before_restart = log.read_text()
            kill_node(cluster, worker)
            add_node(cluster)
            driver.wait(timeout=600)
        finally:
            driver.kill()
            driver.wait()
    text = log.read_text()
    assert driver.returncode == 0 and "final step 200" in text, text[-6000:]

    # Charged to the preemption budget, once: with max_failures=0 a failure would have ended it.
    assert CHARGED.findall(text) == ["preemption"], text[-6000:]

    # Rank 0 saved at the window after the notice (checkpoint_every=200 makes no other before the
    # end), the group resumed from such a checkpoint, having lost at most a window of progress.
    noticed = [int(s) for s in NOTICED.findall(text)]
    resumed = [int(s) for s in RESUMED.findall(text)]
    assert len(noticed) == 1 and 0 < noticed[0] < 200, text[-6000:]
    assert len(resumed) == 1 and noticed[0] <= resumed[0] < 200, text[-6000:]
    logged = max(int(s) for s in WINDOW.findall(before_restart))
    assert resumed[0] >= logged - LOG_EVERY, (resumed, logged)

    # Bitwise the uninterrupted run of the same world size (on the session's one-node cluster),
    # and its history, loss for loss.
    cfg = load_config(None, [*overrides, "train.run_id=straight", "train.placement_strategy=PACK"])
    train(cfg, store, shard_dataset(cfg.data, store).manifest)
    a, b = final_state(store, "straight"), final_state(store, "drained")
    assert a["step"] == b["step"] == 200
    assert_same_training_state(a, b)

    def losses(run_id: str) -> list[tuple[int, float]]:
        history = TrainHistory.read(store, layout.train_history(run_id))
        return [(w.step, w.loss) for w in history.windows]

    assert losses("drained") == losses("straight")
