"""Connecting to Ray: the cluster at `ray.address` (resolved from $RAY_ADDRESS at config load), else a
local one (the embedded default)."""

from __future__ import annotations

import logging
import os

from tasks.config import RayConfig
from tasks.runtime import setup_process

log = logging.getLogger(__name__)

_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def ensure_ray(cfg: RayConfig) -> None:
    """Initialise Ray once per process. A remote cluster gets our packages shipped as py_modules,
    so its workers need only the dependencies (infra/ray-cluster.yaml installs them)."""
    setup_process()  # before Ray is imported
    import ray

    if ray.is_initialized():
        return
    address = cfg.address
    if address:
        # Only non-secret settings travel; credentials come from the cluster nodes' own environment
        # or instance role (README: Ray cluster), never through Ray's runtime_env.
        env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        import diffusion_core
        import tasks

        modules = [diffusion_core, tasks]  # Ray zips and uploads each package with the job
        log.info("connecting to Ray cluster at %s", address)
        ray.init(
            address=address,
            runtime_env={"py_modules": modules, "env_vars": env_vars},
            log_to_driver=cfg.worker_logs,
        )
    else:
        log.info("starting a local Ray cluster (num_cpus=%s)", cfg.num_cpus or "all")
        # Local workers inherit this process's environment (credentials included) from ray.init.
        # address="local": always a new cluster of our own, never one found through /tmp/ray.
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            log_to_driver=cfg.worker_logs,
        )


class ResourcesUnavailableError(ValueError):
    """A request the Ray cluster can never satisfy (it would wait forever)."""


def check_resources(
    cfg: RayConfig, bundle: dict[str, float], count: int, what: str, *, one_per_node: bool = False
) -> None:
    """Fail at once when `count` x `bundle` (e.g. {"CPU": 1, "GPU": 1} per training worker) cannot
    fit the cluster: each bundle on one node, all of them together (`one_per_node`: each on a node
    of its own). An autoscaling cluster (`ray.autoscaling`) is trusted to grow instead."""
    import ray

    if cfg.autoscaling:
        return
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    totals = {r: sum(n.get(r, 0.0) for n in nodes) for r in bundle}
    fits = [
        int(min(n.get(r, 0.0) / amount for r, amount in bundle.items() if amount > 0))
        for n in nodes
    ]
    per_node_fit = sum(min(f, 1) if one_per_node else f for f in fits)
    if per_node_fit >= count:
        return
    asked = ", ".join(f"{r}: {a:g}" for r, a in bundle.items())
    has = ", ".join(f"{r}: {totals[r]:g}" for r in bundle)
    raise ResourcesUnavailableError(
        f"{what} asks for {count} x {{{asked}}}, but the Ray cluster has {{{has}}} in all over "
        f"{len(nodes)} node(s) and fits only {per_node_fit}"
        f"{' on distinct nodes (train.placement_strategy=STRICT_SPREAD)' if one_per_node else ''}"
        "; lower the request, add nodes, or set "
        "ray.autoscaling=true if the cluster grows on demand"
    )
