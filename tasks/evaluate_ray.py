"""Run the evaluation where the GPUs are: a Ray task with one GPU (`evaluate.use_gpu`), so the
Inception passes over tens of thousands of images do not run on the orchestrating machine."""

from __future__ import annotations

from typing import Any

from tasks.config import PipelineConfig
from tasks.evaluate import evaluate_samples
from tasks.ray_runtime import ensure_ray
from tasks.storage import Store


def _evaluate_remote(
    cfg: PipelineConfig, manifest: dict[str, Any], samples_key: str, out_prefix: str
) -> dict[str, Any]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_samples(
        Store(cfg.storage), manifest, samples_key, cfg.evaluate, out_prefix, device=device
    )


def evaluate(
    cfg: PipelineConfig, manifest: dict[str, Any], samples_key: str, out_prefix: str
) -> dict[str, Any]:
    """Evaluate in this process on CPU, or as a one-GPU Ray task when `evaluate.use_gpu`."""
    if not cfg.evaluate.use_gpu:
        return evaluate_samples(
            Store(cfg.storage), manifest, samples_key, cfg.evaluate, out_prefix, device="cpu"
        )
    ensure_ray(cfg.ray)
    import ray

    remote = ray.remote(_evaluate_remote).options(num_gpus=1, num_cpus=cfg.evaluate.cpus)
    return ray.get(remote.remote(cfg, manifest, samples_key, out_prefix))
