"""Training in the tests: a tiny run to start from, the final training state of a run, and the
bitwise comparison the exact-resume, worker-kill, driver-kill and multi-node tests make of two
runs."""

from __future__ import annotations

from typing import Any

import torch

from diffusion_core.checkpoint import load_checkpoint
from tasks.config import PipelineConfig
from tasks.records import Checkpoint, DatasetManifest
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.loop import TrainJob, run_training


def final_state(store: Store, run_id: str) -> dict[str, Any]:
    """The checkpoint `latest.json` of `run_id` points at, sha256-checked and loaded."""
    latest = Checkpoint.latest(store, run_id)
    assert latest is not None, f"run {run_id!r} has no checkpoint"
    return load_checkpoint(latest.read_bytes(store))


def _same_tensors(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{what}[{k}]"
        else:
            assert a[k] == b[k], f"{what}[{k}]"


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Step, model, EMA model, the power EMAs (post-hoc EMA, when kept) and every optimizer state
    tensor equal, bit for bit."""
    assert a["step"] == b["step"]
    _same_tensors(a["model"], b["model"], "model")
    _same_tensors(a["ema"]["model"], b["ema"]["model"], "ema")
    assert ("phema" in a) == ("phema" in b)
    if "phema" in a:
        pa, pb = a["phema"], b["phema"]
        assert (pa["step"], pa["sigma_rels"]) == (pb["step"], pb["sigma_rels"])
        for i, (ta, tb) in enumerate(zip(pa["averages"], pb["averages"], strict=True)):
            _same_tensors(ta, tb, f"power EMA {i}")
    states = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True)
    for i, (sa, sb) in enumerate(states):
        _same_tensors(sa, sb, f"optimizer state {i}")


def shard_and_train(store: Store, cfg: PipelineConfig) -> tuple[DatasetManifest, Checkpoint]:
    """Shard `cfg.data` into `store` and train to `cfg.train.steps` in this process (the code
    path of one Ray worker, world size 1): what a sampling or evaluation test starts from."""
    manifest = shard_dataset(cfg.data, store).manifest
    job = TrainJob(config=cfg, target_step=cfg.train.steps, manifest=manifest)
    return manifest, run_training(job).checkpoint
