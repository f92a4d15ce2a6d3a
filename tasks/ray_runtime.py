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
            log_to_driver=True,
        )
    else:
        log.info("starting a local Ray cluster (num_cpus=%s)", cfg.num_cpus or "all")
        # Local workers inherit this process's environment (credentials included) from ray.init.
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False)
