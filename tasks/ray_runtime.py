"""Connecting to Ray: the cluster at `ray.address` (resolved from $RAY_ADDRESS at config load), else a
local one (the embedded default)."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
from typing import Any

from tasks import usage
from tasks.config import RayConfig
from tasks.runtime import ray_temp_root, setup_process, temp_prefix

log = logging.getLogger(__name__)

_FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def cluster_runtime_env() -> dict[str, Any]:
    """What a driver on a cluster gives its workers: our packages as `py_modules` and the
    non-secret AWS settings as `env_vars`.

    Plain data only (directory paths, strings): under the Jobs API Ray deep-copies this to merge
    it with the job's own runtime_env, and a module object cannot be copied ("cannot pickle
    'module' object"). Ray zips and uploads each package directory with the job. Credentials
    come from the cluster nodes' own environment or instance role (README: Ray cluster), never
    through Ray's runtime_env."""
    import diffusion_core
    import tasks

    packages = [p.__path__[0] for p in (diffusion_core, tasks)]  # the package directories
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    return {"py_modules": packages, "env_vars": env_vars}


def ensure_ray(cfg: RayConfig) -> None:
    """Initialise Ray once per process. A remote cluster gets our packages shipped as py_modules,
    so its workers need only the dependencies (infra/ray-cluster.yaml installs them)."""
    setup_process()  # before Ray is imported
    import ray

    if ray.is_initialized():
        usage.start_ledger(on_driver_node())  # Ray may have been started by another caller
        return
    address = cfg.address
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, runtime_env=cluster_runtime_env(), log_to_driver=cfg.worker_logs)
    else:
        log.info("starting a local Ray cluster (num_cpus=%s)", cfg.num_cpus or "all")
        _start_local_cluster(cfg)
    # Where the workers report what they did (`tasks.usage`): it lives as long as this driver.
    usage.start_ledger(on_driver_node())


def _start_local_cluster(cfg: RayConfig) -> None:
    """A Ray cluster of this process's own, that only this process (and its workers) can use,
    and that leaves no folder behind.

    Ray 2.60 has no setting that binds its gRPC servers (GCS, raylet, every worker) to loopback:
    they listen on all interfaces. What keeps others from running code on it is Ray's token auth,
    with a token made for this process: it lives in this process's environment, which the
    workers inherit, never in a file (~/.ray/auth_token is left alone). A setting already in the
    environment wins (RAY_AUTH_MODE=disabled turns it off).

    Ray's session folder (logs, sockets, spilled objects) goes in a temporary folder named with
    `temp_prefix`: removed at exit, or by the run's watchdog once the process is gone (SIGKILL
    included), instead of piling up in /tmp/ray."""
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & os.environ.keys():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    # Ray reads the mode when it is imported and keeps a token once read: make it read both
    # again, as ray.init itself does when it turns token auth on.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()

    folder = tempfile.mkdtemp(prefix=temp_prefix() + "ray-", dir=ray_temp_root())
    atexit.register(_remove_local_cluster, folder)  # runs before Ray's own atexit shutdown
    # Local workers inherit this process's environment (credentials included) from ray.init.
    # address="local": always a new cluster of our own, never one found through /tmp/ray.
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        log_to_driver=cfg.worker_logs,
        _temp_dir=folder,
    )
    os.chmod(folder, 0o700)  # Ray opens its folders to every user (0777) for shared clusters


def _remove_local_cluster(folder: str) -> None:
    """Stop the local cluster, then remove its folder (Ray's shutdown leaves it behind)."""
    import ray

    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def on_driver_node() -> dict[str, Any]:
    """Actor options that place an actor on this process's (the driver's) node and nowhere else.

    For the actors the driver itself relies on (the training progress and error queues): placed
    by Ray, one could land on a worker node, and losing that node would end the run with
    ActorDiedError before Ray Train's FailureConfig got a chance. On the driver's node it lives
    exactly as long as the driver (Ray Train pins its controller the same way)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def restartable(max_restarts: int) -> dict[str, int]:
    """Actor options for a pool actor whose work may run again anywhere (a seed range, a shard):
    a lost actor (its node gone, its process killed) is restarted up to `max_restarts` times and
    its unfinished calls run again on the restarted one.

    The calls retry without a count of their own (`max_task_retries=-1`: until they succeed or the
    actor is dead for good, Ray's documented setting). A count would be spent in seconds while
    the cluster still takes a lost node for alive (each call fails at once with
    ActorUnavailableError), so the run would fail before the actor was ever restarted."""
    return {"max_restarts": max_restarts, "max_task_retries": -1}


class ResourcesUnavailableError(ValueError):
    """A request the Ray cluster can never satisfy (it would wait forever)."""


def bundles_that_fit(
    nodes: list[dict[str, float]], bundle: dict[str, float], *, one_per_node: bool = False
) -> int:
    """How many `bundle`s (e.g. {"CPU": 1, "GPU": 1}) the `nodes` (each node's resources, as
    `ray.nodes()` gives them) hold, each bundle on one node; `one_per_node`: at most one a node.
    The one "does it fit" calculation: `check_resources` and `jobs.pool_size` both ask it."""
    asked = {r: amount for r, amount in bundle.items() if amount > 0}
    assert asked, f"a bundle asks for no resource: {bundle}"
    per_node = [int(min(n.get(r, 0.0) / amount for r, amount in asked.items())) for n in nodes]
    return sum(min(f, 1) if one_per_node else f for f in per_node)


def live_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected Ray cluster."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_resources(
    cfg: RayConfig, bundle: dict[str, float], count: int, what: str, *, one_per_node: bool = False
) -> None:
    """Fail at once when `count` x `bundle` (e.g. {"CPU": 1, "GPU": 1} per training worker) cannot
    fit the cluster: each bundle on one node, all of them together (`one_per_node`: each on a node
    of its own). An autoscaling cluster (`ray.autoscaling`) is trusted to grow instead."""
    if cfg.autoscaling:
        return
    nodes = live_nodes()
    fit = bundles_that_fit(nodes, bundle, one_per_node=one_per_node)
    if fit >= count:
        return
    totals = {r: sum(n.get(r, 0.0) for n in nodes) for r in bundle}
    asked = ", ".join(f"{r}: {a:g}" for r, a in bundle.items())
    has = ", ".join(f"{r}: {totals[r]:g}" for r in bundle)
    raise ResourcesUnavailableError(
        f"{what} asks for {count} x {{{asked}}}, but the Ray cluster has {{{has}}} in all over "
        f"{len(nodes)} node(s) and fits only {fit}"
        f"{' on distinct nodes (train.placement_strategy=STRICT_SPREAD)' if one_per_node else ''}"
        "; lower the request, add nodes, or set "
        "ray.autoscaling=true if the cluster grows on demand"
    )
