"""Promotion: only a better *and comparable* evaluation replaces the promoted model."""

from __future__ import annotations

import pytest

from tasks.config import PromoteConfig, StorageConfig
from tasks.promote import promote_if_better
from tasks.storage import Store


def _metrics(fid: float, *, sha: str = "a" * 64, steps: int = 50) -> dict:
    return {
        "fid": fid,
        "kid_mean": fid / 10,
        "extractor": {"weights_sha256": sha},
        "steps": steps,
        "reference_stats_key": "stats/x/a-n180.npz",
        "num_images": 256,
        "sampler": "ddim",
        "eta": 0.0,
        "guidance_scale": 1.0,
    }


@pytest.fixture
def store(tmp_path):
    s = Store(StorageConfig(root=str(tmp_path)))
    for step in (1, 2, 3, 4):
        s.write_bytes(f"runs/r/checkpoints/step-{step:08d}.pt", f"weights {step}".encode())
    return s


def test_promotes_first_then_only_better_and_comparable(store):
    cfg = PromoteConfig()
    ckpt = "runs/r/checkpoints/step-{:08d}.pt".format
    assert promote_if_better(store, cfg, _metrics(5.0), ckpt(1))["promoted"]
    worse = promote_if_better(store, cfg, _metrics(6.0), ckpt(2))
    assert not worse["promoted"] and "not better" in worse["reason"]
    other_extractor = promote_if_better(store, cfg, _metrics(1.0, sha="b" * 64), ckpt(3))
    assert not other_extractor["promoted"] and "extractor" in other_extractor["reason"]
    other_steps = promote_if_better(store, cfg, _metrics(1.0, steps=20), ckpt(3))
    assert not other_steps["promoted"] and "steps" in other_steps["reason"]
    better = promote_if_better(store, cfg, _metrics(4.0), ckpt(4))
    assert better["promoted"]

    current = store.read_json("models/default/current.json")
    assert current["source_checkpoint_key"] == ckpt(4) and current["metrics"]["fid"] == 4.0
    assert (
        store.read_bytes(current["checkpoint_key"]) == b"weights 4"
    )  # a copy that outlives pruning
    assert [d["promoted"] for d in store.read_json("models/default/history.json")] == [
        True,
        False,
        False,
        False,
        True,
    ]


def test_metric_missing_from_evaluation_is_a_clear_error(store):
    m = _metrics(5.0)
    del m["kid_mean"]
    with pytest.raises(ValueError, match="evaluate.metrics"):
        promote_if_better(
            store, PromoteConfig(metric="kid"), m, "runs/r/checkpoints/step-00000001.pt"
        )
