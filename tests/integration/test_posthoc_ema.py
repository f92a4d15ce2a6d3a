"""Post-hoc EMA end to end on a tiny run: training keeps power-EMA snapshots of two widths, then
the `ema` flow rebuilds two widths from them, samples and scores each on the same seed ranges
(real Ray actors, the stand-in extractor, Prefect's test harness) and reports the one chosen."""

from __future__ import annotations

import time

import pytest
import torch

from diffusion_core.checkpoint import load_checkpoint
from tasks import layout
from tasks.config import StorageConfig
from tasks.records import Checkpoint, EmaChoice, Metrics
from tasks.storage import Store
from tests.support.config import tiny_config, tiny_overrides
from tests.support.training import shard_and_train

pytestmark = pytest.mark.slow  # Ray actor pools, Prefect's test harness, InceptionV3 on CPU

RUN = "phema"
# 20 steps, snapshots of sigma_rel 0.05 and 0.10 every 5; two seed ranges of 4 images per width,
# on one sampling and one extraction actor (each loads its network once).
POSTHOC: dict[str, dict[str, object]] = {
    "train": {
        "run_id": RUN,
        "steps": 20,
        "checkpoint_every": 10,
        "log_every": 10,
        "phema_sigma_rels": [0.05, 0.1],
        "phema_every": 5,
    },
    "sample": {"workers": 1},
    "evaluate": {"repeats": 2, "metrics": ["fid"], "grid_images": 4, "workers": 1},
}
STAMP = "20261207T000000Z"


def test_snapshots_rebuild_score_and_choose(tmp_path, ray_cluster, prefect_harness):
    from flows.choose import ema_flow

    store = Store(StorageConfig(root=str(tmp_path / "store")))
    started = time.perf_counter()
    shard_and_train(store, tiny_config(store.config.root, POSTHOC))
    trained = time.perf_counter()

    # Every 5 steps, one snapshot per width; checkpoint pruning leaves them alone.
    for sigma_rel in (0.05, 0.1):
        for step in (5, 10, 15, 20):
            assert store.exists(layout.phema_snapshot(RUN, sigma_rel, step)), (sigma_rel, step)

    choice = ema_flow(
        overrides=[f"storage.root={store.config.root}", *tiny_overrides(POSTHOC)],
        sigma_rels=[0.07, 0.1],
        stamp=STAMP,
    )
    print(
        f"\ntrain 20 steps: {trained - started:.1f} s; ema flow (2 widths x 2 x 4 images): "
        f"{time.perf_counter() - trained:.1f} s"
    )

    # The rebuilt 0.10 at step 20 is the 0.10 snapshot of step 20 (its own profile).
    assert choice.step == 20 and choice.snapshot_steps == [5, 10, 15, 20]
    rebuilt = Checkpoint.read(store, layout.phema_rebuilt_record(RUN, 0.1, 20))
    weights = load_checkpoint(rebuilt.read_bytes(store))["ema"]["model"]
    snapshot = load_checkpoint(store.read_bytes(layout.phema_snapshot(RUN, 0.1, 20)))["model"]
    assert weights.keys() == snapshot.keys()
    for name, w in snapshot.items():
        torch.testing.assert_close(weights[name], w, rtol=0, atol=1e-6, msg=name)

    # Each width was sampled (its own set) and scored on the same two seed ranges.
    assert sorted(c.sigma_rel for c in choice.candidates) == [0.07, 0.1]
    metrics = [Metrics.read(store, c.metrics_key) for c in choice.candidates]
    assert len({m.sample_set for m in metrics}) == 2
    for c, m in zip(choice.candidates, metrics, strict=True):
        assert m.checkpoint_key == layout.phema_rebuilt(RUN, c.sigma_rel, 20)
        assert m.weights == "ema" and len(m.fids) == 2 and m.fids == c.fids
        assert m.seed_ranges == metrics[0].seed_ranges
    best = min(choice.candidates, key=lambda c: c.fid or float("inf"))
    assert choice.chosen == choice.best == best.sigma_rel and best.within_noise

    # The report names the choice; the record beside it is the one returned.
    md = store.read_bytes(choice.report_key).decode()
    assert f"Chosen: sigma_rel {choice.chosen:g}: FID" in md
    assert "| sigma_rel | FID mean ± std | per seed range | within noise of best | chosen |" in md
    assert "winner's curse" in md
    assert '<section id="lengths">' in store.read_bytes(choice.report_html_key).decode()
    assert EmaChoice.read(store, layout.ema_choice_record(choice.prefix)) == choice
    assert choice.report_url == store.url(choice.report_html_key)
