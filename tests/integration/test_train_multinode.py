"""Training across nodes: a real two-node Ray cluster on this machine (a head and a worker node of
one CPU each), one training worker per node (train.placement_strategy=STRICT_SPREAD), shards
streamed from the S3 test server, and a driver that reaches the cluster as production does,
through RAY_ADDRESS (the cluster's GCS address), not Ray Client. The nodes get their storage
credentials from their own environment. The result is bitwise the result of the same world size
on one node."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tasks.config import load_config
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.stage import train
from tests.support.config import tiny_overrides
from tests.support.paths import REPO
from tests.support.training import assert_same_training_state, final_state

pytestmark = pytest.mark.slow

# 8 steps on 2 workers, one per node, streaming 96 digits in shards of 24.
OVERRIDES = tiny_overrides(
    {
        "data": {"max_images": 96, "samples_per_shard": 24},
        "train": {
            "steps": 8,
            "checkpoint_every": 4,
            "log_every": 4,
            "warmup_steps": 2,
            "ema_warmup_steps": 2,
            "workers": 2,
            "placement_strategy": "STRICT_SPREAD",
        },
    }
)

# The driver as production runs it: its own process, the cluster named by RAY_ADDRESS alone.
DRIVER = textwrap.dedent(
    """
    import logging, sys
    from tasks.config import load_config
    from tasks.records import DatasetManifest
    from tasks.shard.stage import shard_dataset
    from tasks.storage import Store
    from tasks.train.stage import train

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = load_config(None, sys.argv[1:])
    store = Store(cfg.storage)
    result = train(cfg, store, shard_dataset(cfg.data, store).manifest)
    print("final step", result.checkpoint.step)
    """
)


def test_one_worker_per_node_streaming_from_s3_equals_one_node(s3_storage, ray_cluster):
    from ray.cluster_utils import Cluster

    storage = [f"storage.root={s3_storage.root}", f"storage.endpoint_url={s3_storage.endpoint_url}"]
    one_node = load_config(None, [*storage, *OVERRIDES, "train.run_id=one-node"])
    store = Store(one_node.storage)
    local = one_node.model_copy(  # the session's one-node cluster has 2 CPUs on one node
        update={"train": one_node.train.model_copy(update={"placement_strategy": "PACK"})}
    )
    train(local, store, shard_dataset(one_node.data, store).manifest)

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        address = cluster.address
        nodes = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
        # The driver's own environment names the cluster; the token of the cluster's
        # authentication (RAY_AUTH_MODE=token) is this machine's (~/.ray/auth_token).
        env = os.environ | {"RAY_ADDRESS": address, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, *storage, *OVERRIDES, "train.run_id=multi-node"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        cluster.shutdown()
    assert run.returncode == 0, run.stderr[-4000:]
    assert "final step 8" in run.stdout
    assert f"connecting to Ray cluster at {address}" in run.stderr
    placed = dict(re.findall(r"rank (\d) runs on node (\w+)", run.stderr))
    assert sorted(placed) == ["0", "1"] and placed["0"] != placed["1"], run.stderr[-4000:]
    assert set(placed.values()) == nodes

    a, b = final_state(store, "one-node"), final_state(store, "multi-node")
    assert a["step"] == b["step"] == 8
    assert_same_training_state(a, b)
