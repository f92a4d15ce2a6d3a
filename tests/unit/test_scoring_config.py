"""Scoring while training (`evaluate.score_every`): which checkpoints are scored, and the seed
ranges a config may give them (never the evaluation's, which confirm the chosen one)."""

from __future__ import annotations

import pytest

from flows.scoring import scored
from tasks.config import ConfigError, load_config


def test_every_kth_checkpoint_and_the_last_are_scored():
    cfg = load_config(None, ["train.checkpoint_every=100", "evaluate.score_every=2"])
    chosen = [step for step in range(100, 1001, 100) if scored(step, cfg, last=step == 1000)]
    assert chosen == [200, 400, 600, 800, 1000]
    assert scored(300, cfg, last=True)  # the stage's last checkpoint, wherever it falls
    assert not scored(250, cfg, last=False)  # a spot drain's just-in-time checkpoint
    off = load_config(None, ["train.checkpoint_every=100"])
    assert not any(scored(step, off, last=True) for step in (100, 200))


def test_scored_seeds_may_not_overlap_the_evaluations():
    # The evaluation uses seeds [0, 3 * 128); ranges from 300 would overlap it.
    with pytest.raises(ConfigError, match="score_seed_start"):
        load_config(None, ["evaluate.score_every=1", "evaluate.score_seed_start=300"])
    cfg = load_config(None, ["evaluate.score_every=1", "evaluate.score_seed_start=384"])
    assert cfg.evaluate.score_seed_start == 384
    # Off, the field is not checked: nothing is scored with it.
    load_config(None, ["evaluate.score_seed_start=0"])


def test_the_selection_may_not_score_more_images_than_the_confirmation():
    with pytest.raises(ConfigError, match="evaluate.score_images"):
        load_config(None, ["evaluate.score_every=1", "evaluate.score_images=256"])
