"""Checkpoints scored while training runs (`evaluate.score_every`): a tiny nightly scores each
checkpoint on seed ranges of its own while the ranks train, records the scores over steps
(history.json, TensorBoard, the report), and confirms the best one on the evaluation's own seed
ranges before the gate (real Ray actors, the stand-in extractor, Prefect's test harness)."""

from __future__ import annotations

import pytest

from tasks import layout
from tasks.config import StorageConfig
from tasks.records import Checkpoint, Metrics, NightlySummary, SampleSet, TrainHistory
from tasks.storage import Store
from tests.support.config import tiny_overrides

pytestmark = pytest.mark.slow  # Ray actor pools, Prefect's test harness, InceptionV3 on CPU

RUN = "scored"
NIGHT = "20261206T020000Z"
# Six steps, a checkpoint every three, each scored on two ranges of 4 images; only the newest
# checkpoint is kept besides the best one.
SCORED: dict[str, dict[str, object]] = {
    "train": {
        "run_id": RUN,
        "steps": 6,
        "steps_per_night": 6,
        "checkpoint_every": 3,
        "keep_checkpoints": 1,
    },
    "sample": {"workers": 1},
    "evaluate": {
        "repeats": 2,
        "metrics": ["fid"],
        "grid_images": 4,
        "workers": 1,
        "score_every": 1,
        "score_images": 4,
        "score_repeats": 2,
    },
}


def test_every_checkpoint_is_scored_and_the_best_is_confirmed_on_fresh_seeds(
    tmp_path, ray_cluster, prefect_harness
):
    from flows.nightly import nightly

    store = Store(StorageConfig(root=str(tmp_path / "store")))
    summary = nightly(
        overrides=[f"storage.root={store.config.root}", *tiny_overrides(SCORED)], night=NIGHT
    )

    # Every checkpoint of the night was scored, on two ranges from evaluate.score_seed_start.
    assert [s.step for s in summary.scores] == [3, 6]
    for score in summary.scores:
        assert len(score.values) == 2 and score.num_images == 4 and score.metric == "fid"
        scored = Metrics.read(store, score.metrics_key)
        sample_set = SampleSet.read(store, scored.samples_key)
        assert sample_set.config.seed_start == 1_000_000_000
        assert scored.checkpoint_step == score.step

    # The challenger is the best-scored checkpoint, scored again at full n on the evaluation's
    # own seeds (sample.seed_start = 0), which the selection never saw.
    best = min(summary.scores, key=lambda s: (s.mean, -s.step))
    assert summary.checkpoint_key == layout.checkpoint(RUN, best.step)
    assert summary.metrics.checkpoint_step == best.step
    confirmation = SampleSet.read(store, summary.metrics.samples_key)
    assert confirmation.config.seed_start == 0
    assert summary.promotion.checkpoint_key == summary.checkpoint_key

    # Scores over steps: in the run's history.json and TensorBoard.
    history = TrainHistory.read(store, layout.train_history(RUN))
    assert history.scores == summary.scores
    assert history.windows, "the loss windows stay beside the scores"
    events = store.list(layout.tensorboard_prefix(RUN))
    assert any(".scores-00000003-00000006" in key for key in events), events

    # Checkpoints were kept until scored, then pruned to the newest one and the best one.
    kept = {k for k in store.list(layout.checkpoints_prefix(RUN)) if k.endswith(".pt")}
    assert kept == {layout.checkpoint(RUN, 6), layout.checkpoint(RUN, best.step)}
    assert Checkpoint.require_latest(store, RUN).step == 6

    # The report shows the scores over steps, the chosen one and its confirmed score.
    stored = NightlySummary.read(store, layout.nightly_latest(RUN))
    assert stored.scores == summary.scores
    html = store.read_bytes(stored.report_html_key).decode()
    assert 'id="checkpoints"' in html
    assert f"Chosen: step {best.step}" in html
    assert "winner" in html
    figure = layout.nightly_figure(layout.nightly_prefix(RUN, NIGHT), "scores")
    assert store.read_bytes(figure)[:8] == b"\x89PNG\r\n\x1a\n"
