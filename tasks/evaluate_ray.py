"""Run the evaluation where the GPUs are: a Ray task with one GPU (`evaluate.use_gpu`), so the
Inception passes over tens of thousands of images do not run on the orchestrating machine."""

from __future__ import annotations

from tasks.config import EvalConfig, RayConfig, StorageConfig
from tasks.evaluate import evaluate_samples
from tasks.ray_runtime import check_resources, ensure_ray
from tasks.records import DatasetManifest, Evaluation, SampleSet
from tasks.storage import Store, open_store


def _evaluate_remote(
    storage: StorageConfig, cfg: EvalConfig, dataset: DatasetManifest, samples: SampleSet
) -> Evaluation:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate_samples(open_store(storage), dataset, samples, cfg, device=device)


def evaluate(
    store: Store,
    cfg: EvalConfig,
    ray_cfg: RayConfig,
    dataset: DatasetManifest,
    samples: SampleSet,
) -> Evaluation:
    """Evaluate in this process on CPU, or as a one-GPU Ray task when `evaluate.use_gpu`."""
    if not cfg.use_gpu:
        return evaluate_samples(store, dataset, samples, cfg, device="cpu")
    ensure_ray(ray_cfg)
    check_resources(ray_cfg, {"CPU": cfg.cpus, "GPU": 1.0}, 1, "evaluation (evaluate.use_gpu)")
    import ray

    remote = ray.remote(_evaluate_remote).options(num_gpus=1, num_cpus=cfg.cpus)
    result: Evaluation = ray.get(remote.remote(store.config, cfg, dataset, samples))
    return result
