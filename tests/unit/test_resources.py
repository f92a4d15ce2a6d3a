"""The one "does it fit the cluster" calculation (`bundles_that_fit`), which both the up-front check
(`check_resources`) and the pools' default size (`jobs.pool_size`) use."""

from __future__ import annotations

from tasks.config import RayConfig
from tasks.jobs import pool_size
from tasks.ray_runtime import bundles_that_fit

NODES = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 3.0}, {"CPU": 4.0, "GPU": 1.0}]


def test_each_bundle_fits_on_one_node():
    assert bundles_that_fit(NODES, {"CPU": 1.0}) == 15
    assert bundles_that_fit(NODES, {"CPU": 2.0}) == 4 + 1 + 2  # 3 CPUs hold one, not one and a half
    assert bundles_that_fit(NODES, {"CPU": 1.0, "GPU": 1.0}) == 3
    assert bundles_that_fit(NODES, {"CPU": 4.0, "GPU": 1.0}) == 2 + 1
    assert bundles_that_fit(NODES, {"CPU": 1.0, "GPU": 0.0}) == 15  # asking for none is no limit
    assert bundles_that_fit(NODES, {"CPU": 9.0}) == 0
    assert bundles_that_fit([], {"CPU": 1.0}) == 0


def test_one_per_node_counts_nodes_that_hold_one():
    assert bundles_that_fit(NODES, {"CPU": 1.0}, one_per_node=True) == 3
    assert bundles_that_fit(NODES, {"CPU": 4.0}, one_per_node=True) == 2


def test_a_pool_asked_for_or_on_an_autoscaling_cluster_needs_no_ray():
    fixed, growing = RayConfig(), RayConfig(autoscaling=True)
    assert pool_size(fixed, {"CPU": 1.0}, 3, units=10) == 3
    assert pool_size(fixed, {"CPU": 1.0}, 30, units=10) == 10
    assert pool_size(growing, {"CPU": 1.0}, None, units=7) == 7
    assert pool_size(growing, {"CPU": 1.0}, None, units=0) == 1
