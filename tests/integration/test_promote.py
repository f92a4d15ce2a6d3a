"""Promotion: only a better *and comparable* evaluation replaces the promoted model."""

from __future__ import annotations

import hashlib

import pytest

from diffusion_core.unet import UNetConfig
from tasks import layout
from tasks.config import ModelConfig, PromoteConfig, SampleConfig, StorageConfig
from tasks.promote import promote_if_better
from tasks.records import (
    Champion,
    Checkpoint,
    ExtractorRecord,
    Metrics,
    PromotionHistory,
    RecordFormatError,
)
from tasks.storage import Store


def _metrics(
    fid: float | None, *, sha: str = "a" * 64, steps: int = 50, kid: bool = True
) -> Metrics:
    return Metrics(
        run_id="r",
        sample_set="step-00000001-ddim-50-abc",
        samples_key="runs/r/samples/x/manifest.json",
        checkpoint_key="runs/r/checkpoints/step-00000001.pt",
        checkpoint_step=1,
        sampling=SampleConfig(steps=steps),
        num_images=256,
        num_reference_images=180,
        reference_stats_key="stats/x/a-n180.npz",
        dataset_fingerprint="x",
        fid=fid,
        kid_mean=fid / 10 if kid and fid is not None else None,
        extractor=ExtractorRecord(label="stand-in", weights_sha256=sha, standard=False, source="t"),
        created="2026-11-25T00:00:00+00:00",
    )


@pytest.fixture
def store(tmp_path):
    return Store(StorageConfig(root=str(tmp_path)))


def _checkpoint(store: Store, step: int) -> Checkpoint:
    data = f"weights {step}".encode()
    key = layout.checkpoint("r", step)
    store.write_bytes(key, data)
    return Checkpoint(
        run_id="r",
        step=step,
        key=key,
        sha256=hashlib.sha256(data).hexdigest(),
        unet=UNetConfig(),
        model=ModelConfig(),
        dataset_fingerprint="x",
    )


def test_promotes_first_then_only_better_and_comparable(store):
    cfg = PromoteConfig()
    ckpt = {step: _checkpoint(store, step) for step in (1, 2, 3, 4)}
    assert promote_if_better(store, cfg, _metrics(5.0), ckpt[1]).promoted
    worse = promote_if_better(store, cfg, _metrics(6.0), ckpt[2])
    assert not worse.promoted and "not better" in worse.reason
    other_extractor = promote_if_better(store, cfg, _metrics(1.0, sha="b" * 64), ckpt[3])
    assert not other_extractor.promoted and "extractor" in other_extractor.reason
    other_steps = promote_if_better(store, cfg, _metrics(1.0, steps=20), ckpt[3])
    assert not other_steps.promoted and "steps: 50 -> 20" in other_steps.reason
    better = promote_if_better(store, cfg, _metrics(4.0), ckpt[4])
    assert better.promoted and better.promoted_key == layout.model_checkpoint("default", 4)

    current = Champion.read(store, layout.model_current("default"))
    assert current.source_checkpoint_key == ckpt[4].key and current.metrics.fid == 4.0
    # a copy that outlives pruning
    assert store.read_bytes(current.checkpoint_key) == b"weights 4"
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [d.promoted for d in history.decisions] == [True, False, False, False, True]
    assert history.decisions[-1] == better


def test_metric_missing_from_evaluation_is_a_clear_error(store):
    with pytest.raises(ValueError, match="evaluate.metrics"):
        promote_if_better(
            store, PromoteConfig(metric="kid"), _metrics(5.0, kid=False), _checkpoint(store, 1)
        )


def test_a_damaged_checkpoint_is_never_promoted(store):
    ckpt = _checkpoint(store, 1)
    store.write_bytes(ckpt.key, b"weights 1 but changed")
    with pytest.raises(RecordFormatError, match="does not match its recorded sha256"):
        promote_if_better(store, PromoteConfig(), _metrics(5.0), ckpt)
    assert not store.exists(layout.model_current("default"))


def test_a_champion_of_another_format_version_is_a_clear_error(store):
    store.write_json(layout.model_current("default"), {"format": "diffusion-pipeline/champion@0"})
    with pytest.raises(RecordFormatError, match="champion@0.*reads diffusion-pipeline/champion@1"):
        promote_if_better(store, PromoteConfig(), _metrics(5.0), _checkpoint(store, 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_evaluation_is_never_promoted(store, bad):
    decision = promote_if_better(store, PromoteConfig(), _metrics(bad), _checkpoint(store, 1))
    assert not decision.promoted and "not trustworthy" in decision.reason
    assert not store.exists(layout.model_current("default"))
    # and a later, sound model is promoted as the first one
    assert promote_if_better(store, PromoteConfig(), _metrics(5.0), _checkpoint(store, 2)).promoted
