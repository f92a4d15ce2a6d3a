"""Losing a whole worker node, in each stage that runs on the cluster: a real Ray cluster on this
machine (a head and one worker node of one CPU each), a driver that reaches it through
RAY_ADDRESS, and in each of training, sampling and feature extraction the worker node killed
(SIGKILL to its raylet and every process on it) while it works, and a replacement node added.

Training resumes from its last checkpoint and ends bitwise equal to an uninterrupted run; the
sampling and feature-extraction actors restart on the replacement and every seed is sampled and
scored once. A node without the storage credentials ends a training run at its first attempt."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tasks import layout
from tasks.config import load_config
from tasks.records import Checkpoint, Metrics
from tasks.sample.stage import find_sample_set
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.stage import train
from tasks.webdata import iter_raw_samples
from tests.support.config import Settings, tiny_overrides
from tests.support.paths import REPO
from tests.support.procs import below, command_line
from tests.support.training import assert_same_training_state, final_state

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc"),
]

# 60 steps on 2 workers, one per node, saving every 10 (the kill comes after the first save); 16
# images in 4 seed ranges of 200 sampler steps each (long enough to be killed in); the stand-in
# extractor's features of the 4 sample shards and the held-out split on 2 actors.
NODE_LOSS: Settings = {
    "data": {"max_images": 96, "samples_per_shard": 24},
    "train": {
        "steps": 60,
        "checkpoint_every": 10,
        "log_every": 10,
        "warmup_steps": 2,
        "ema_warmup_steps": 2,
        "workers": 2,
        "placement_strategy": "STRICT_SPREAD",
    },
    "sample": {"num_images": 16, "images_per_task": 4, "batch_size": 4, "steps": 200, "workers": 2},
    "evaluate": {"metrics": ["fid"], "repeats": 1, "grid_images": 4, "workers": 2},
}

# The driver as production runs it: its own process on the head, the cluster named by RAY_ADDRESS.
# It says which stage it is in, so that the test kills the node in the stage it means to.
DRIVER = textwrap.dedent(
    """
    import logging, sys
    from tasks.config import load_config
    from tasks.evaluate.stage import evaluate
    from tasks.sample.stage import sample_images
    from tasks.shard.stage import shard_dataset
    from tasks.storage import Store
    from tasks.train.stage import train

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = load_config(None, sys.argv[1:])
    store = Store(cfg.storage)
    dataset = shard_dataset(cfg.data, store).manifest
    print("STAGE train", file=sys.stderr, flush=True)
    checkpoint = train(cfg, store, dataset).checkpoint
    print("STAGE sample", file=sys.stderr, flush=True)
    samples = sample_images(store, cfg.sample, cfg.ray, checkpoint, repeats=cfg.evaluate.repeats)
    print("STAGE evaluate", file=sys.stderr, flush=True)
    evaluate(store, cfg.evaluate, cfg.ray, dataset, samples)
    print("STAGE done", file=sys.stderr, flush=True)
    """
)

# A Ray worker's title while it runs an actor method: `ray::<Class>.<method>` (idle: `ray::<Class>`).
METHOD = re.compile(rb"ray::\w+\.(?!__init__\b)\w+")


@contextlib.contextmanager
def cluster_of_two(env: dict[str, str] | None = None) -> Iterator[Any]:
    """A head and one worker node of one CPU each; `env` is the worker node's environment. GCS
    declares a silent node dead after 3 missed health checks a second apart (Ray's default waits
    about 15 s more; the outcome is the same)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "_system_config": {
                "health_check_initial_delay_ms": 1000,
                "health_check_period_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        },
    )
    try:
        add_node(cluster, env)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def add_node(cluster: Any, env: dict[str, str] | None = None) -> Any:
    """A worker node of one CPU whose processes start with `env` (default: this process's)."""
    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        return cluster.add_node(num_cpus=1)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def node_processes(node: Any) -> set[int]:
    """Every process of `node`: those Ray started for it (its raylet, log monitor) and all below
    them (the workers, the raylet's agents)."""
    roots = {info.process.pid for infos in node.all_processes.values() for info in infos}
    return roots | {pid for root in roots for pid in below(root)}


def kill_node(cluster: Any, node: Any) -> None:
    """The whole node at once, as a lost machine: every process of it stopped (so none starts
    another), then SIGKILLed; then dropped from the cluster's list of nodes."""
    pids = node_processes(node)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids | (node_processes(node) if sig == signal.SIGKILL else set()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    cluster.remove_node(node, allow_graceful=False)  # reaps what is already dead


def wait_for(what: str, ready: Callable[[], Any], driver: subprocess.Popen[str], log: Path) -> Any:
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if (value := ready()) is not None:
            return value
        if driver.poll() is not None:
            pytest.fail(f"the driver ended before {what}:\n{log.read_text()[-6000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {what} after 400 s:\n{log.read_text()[-6000:]}")


def titles(node: Any) -> list[bytes]:
    """The titles of the processes of `node` (a Ray worker's: `ray::<Class>.<method>` while it
    runs an actor method, `ray::<Class>` between calls)."""
    return [cmd.split(b"\0")[0] for pid in node_processes(node) if (cmd := command_line(pid))]


def running_method(node: Any) -> bytes | None:
    """The title of a process of `node` that runs an actor method now, if any."""
    return next((title for title in titles(node) if METHOD.fullmatch(title)), None)


def test_a_lost_worker_node_is_survived_in_every_stage(tmp_path, ray_cluster):
    overrides = [f"storage.root={tmp_path / 'store'}", *tiny_overrides(NODE_LOSS)]
    killed: dict[str, Any] = {}
    with cluster_of_two() as cluster:
        first = next(iter(cluster.worker_nodes))
        log = tmp_path / "driver.log"
        env = os.environ | {"RAY_ADDRESS": cluster.address, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        with log.open("w") as out:
            driver = subprocess.Popen(
                [sys.executable, "-c", DRIVER, *overrides, "train.run_id=lost"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        try:
            store = Store(load_config(None, overrides).storage)

            def saved() -> Checkpoint | None:
                return Checkpoint.latest(store, "lost")

            killed["train"] = wait_for("a first checkpoint", saved, driver, log).step

            # Nothing the driver relies on is on the node to be lost (the progress queue, the
            # run's state, Ray Train's controller): only the training worker, Ray's agents and
            # Ray Train's PreemptionWatcher (one per worker group, made again with the group).
            actors = {t for t in titles(first) if re.fullmatch(rb"ray::\w+(\.\w+)?", t)}
            assert actors and all(
                t.startswith(b"ray::RayTrainWorker")
                or t.endswith(b"Agent")
                or t in (b"ray::IDLE", b"ray::PreemptionWatcher")
                for t in actors
            ), actors
            kill_node(cluster, first)
            second = add_node(cluster)

            def stage_busy(stage: str, node: Any) -> Callable[[], bytes | None]:
                return lambda: running_method(node) if f"STAGE {stage}" in log.read_text() else None

            killed["sample"] = wait_for("sampling", stage_busy("sample", second), driver, log)
            kill_node(cluster, second)
            third = add_node(cluster)
            killed["evaluate"] = wait_for("evaluation", stage_busy("evaluate", third), driver, log)
            kill_node(cluster, third)
            add_node(cluster)
            driver.wait(timeout=600)
        finally:
            driver.kill()
            driver.wait()
    text = log.read_text()
    assert driver.returncode == 0 and "STAGE done" in text, text[-6000:]

    # Training: killed after a checkpoint and before its end, placed again on the replacement,
    # ended bitwise as a run on one node that nothing interrupted.
    assert 0 < killed["train"] < 60, killed
    placements = re.findall(r"rank (\d) runs on node (\w+)", text)
    assert len(placements) >= 4, text[-6000:]  # the first attempt, then the restarted group
    assert first.node_id in {n for _, n in placements[:2]}
    assert second.node_id in {n for _, n in placements[-2:]}
    cfg = load_config(None, [*overrides, "train.run_id=straight", "train.placement_strategy=PACK"])
    train(cfg, store, shard_dataset(cfg.data, store).manifest)
    a, b = final_state(store, "straight"), final_state(store, "lost")
    assert a["step"] == b["step"] == 60
    assert_same_training_state(a, b)

    # Sampling: every seed of the set once, in the shard of its range.
    latest = Checkpoint.latest(store, "lost")
    assert latest is not None
    samples = find_sample_set(store, latest, cfg.sample)
    assert samples is not None
    seeds = []
    for shard in samples.shards:
        in_shard = [json.loads(s["json"])["seed"] for s in iter_raw_samples(store, [shard.key])]
        assert in_shard == list(range(shard.seed_start, shard.seed_stop))
        seeds += in_shard
    assert seeds == list(range(16))

    # Feature extraction: the metrics of all 16 samples.
    metrics = Metrics.read(store, layout.eval_metrics(layout.eval_prefix("lost", samples.name)))
    assert metrics.num_images == 16 and metrics.fid is not None


def test_a_node_without_storage_credentials_ends_training_at_the_first_attempt(
    tmp_path, s3_storage, ray_cluster
):
    overrides = [
        f"storage.root={s3_storage.root}",
        f"storage.endpoint_url={s3_storage.endpoint_url}",
        *tiny_overrides(NODE_LOSS),
    ]
    cfg = load_config(None, overrides)
    shard_dataset(cfg.data, Store(cfg.storage))  # here, with credentials: training meets it first
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    no_keys = {k: v for k, v in os.environ.items() if k not in keys}
    with cluster_of_two(env=no_keys) as cluster:
        env = os.environ | {"RAY_ADDRESS": cluster.address, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        run = subprocess.run(
            [str(Path(sys.executable).parent / "diffpipe"), "train", *overrides, "-v"],
            cwd=REPO,
            env=env | {"PREFECT_HOME": str(tmp_path / "prefect")},
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert run.returncode == 1, run.stderr[-6000:]
    final = [line for line in run.stderr.splitlines() if line.startswith("diffpipe train:")]
    assert len(final) == 1 and "no S3 credentials found" in final[0], run.stderr[-6000:]
    # Failed once, not train.max_failures + 1 times: no node will find the credentials on a retry.
    assert "Error count: 1" in run.stderr and "Error count: 2" not in run.stderr, run.stderr[-6000:]
