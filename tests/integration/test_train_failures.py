"""A lost training worker is survived: Ray Train restarts the worker group (train.max_failures)
and training resumes from the last complete checkpoint, ending bitwise equal to a run that lost
nothing. The worker process is really killed (SIGKILL), as a spot preemption or OOM kill would."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tasks import layout
from tasks.config import PipelineConfig, StorageConfig
from tasks.records import Checkpoint, TrainHistory
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.stage import train
from tests.support import procs
from tests.support.config import tiny_config
from tests.support.training import assert_same_training_state, final_state

pytestmark = pytest.mark.slow

# 100 steps on 2 workers, a checkpoint every 10: a kill lands between two checkpoints.
TRAINING = {
    "data": {"max_images": 160, "samples_per_shard": 40},
    "train": {
        "steps": 100,
        "checkpoint_every": 10,
        "log_every": 10,
        "workers": 2,
        "warmup_steps": 5,
        "ema_warmup_steps": 5,
    },
}


def _train_workers() -> list[int]:
    """Our cluster's Ray Train worker processes (not their data-loading children, which share
    the name)."""
    return procs.outermost([pid for pid, cmd in procs.below().items() if b"RayTrainWorker" in cmd])


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc")
def test_a_killed_worker_is_replaced_and_the_result_is_unchanged(tmp_path, ray_cluster):
    store = Store(StorageConfig(root=str(tmp_path)))

    def config(run_id: str) -> PipelineConfig:
        return tiny_config(tmp_path, TRAINING, {"train": {"run_id": run_id}})

    manifest = shard_dataset(config("x").data, store).manifest
    straight = train(config("straight"), store, manifest)
    assert straight.checkpoint.step == 100

    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            latest = Checkpoint.latest(store, "killed")
            workers = _train_workers()
            if latest is not None and latest.step >= 10 and workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed.append(latest.step)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    result = train(config("killed"), store, manifest)
    killer.join(timeout=5)
    assert killed and killed[0] < 100, "no worker was killed mid-run"
    assert result.checkpoint.step == 100

    a, b = final_state(store, "straight"), final_state(store, "killed")
    assert_same_training_state(a, b)

    # The lost attempt's windows were replaced: the history is the uninterrupted run's, loss for loss.
    def losses(run_id: str) -> list[tuple[int, float]]:
        return [
            (w.step, w.loss) for w in TrainHistory.read(store, layout.train_history(run_id)).windows
        ]

    assert losses("killed") == losses("straight") and len(losses("straight")) == 10
