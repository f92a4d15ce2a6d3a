"""Promotion: only a comparable evaluation that is better by more than the measured noise replaces
the champion; one decision per night; the previous champion can be restored."""

from __future__ import annotations

import hashlib
import statistics

import pytest
from scipy.stats import t as student_t

from diffusion_core.unet import UNetConfig
from tasks import layout
from tasks.config import ModelConfig, PromoteConfig, SampleConfig, StorageConfig
from tasks.promote.stage import NothingToRollBackError, promote_if_better, rollback
from tasks.records import (
    Champion,
    Checkpoint,
    ExtractorRecord,
    Metrics,
    PromotionHistory,
    RecordFormatError,
)
from tasks.storage import Store

NIGHTS = [f"202611{d:02d}T020000Z" for d in range(1, 29)]


def _metrics(
    fids: list[float] | float | None,
    *,
    sha: str = "a" * 64,
    steps: int = 50,
    kid: bool = True,
    seed_ranges: list[tuple[int, int]] | None = None,
) -> Metrics:
    """An evaluation with one FID per repeat (a float: one repeat, no noise measured)."""
    values = [fids] if isinstance(fids, float) else (fids or [])
    fid = statistics.fmean(values) if values else None
    ranges = seed_ranges or [(i * 256, (i + 1) * 256) for i in range(max(len(values), 1))]
    return Metrics(
        run_id="r",
        sample_set="step-00000001-ddim-50-abc",
        samples_key="runs/r/samples/x/manifest.json",
        checkpoint_key="runs/r/checkpoints/step-00000001.pt",
        checkpoint_step=1,
        sampling=SampleConfig(steps=steps),
        num_images=256,
        repeats=len(ranges),
        seed_ranges=ranges,
        num_reference_images=180,
        reference_stats_key="stats/x/a-n180.npz",
        dataset_fingerprint="x",
        fid=fid,
        fids=values if len(values) > 1 else [],
        fid_std=statistics.stdev(values) if len(values) > 1 else None,
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


def _champion(store: Store) -> Champion:
    return Champion.read(store, layout.model_current("default"))


def test_promoted_only_when_better_by_more_than_the_noise(store):
    cfg = PromoteConfig()
    ckpt = {step: _checkpoint(store, step) for step in (1, 2, 3)}
    first = promote_if_better(store, cfg, _metrics([0.0903, 0.0921, 0.0885]), ckpt[1], NIGHTS[0])
    assert first.promoted and "no model promoted yet" in first.reason

    # The second night: 0.0900 vs 0.0903 is no difference at this noise.
    tie = promote_if_better(store, cfg, _metrics([0.0900, 0.0880, 0.0920]), ckpt[2], NIGHTS[1])
    e = tie.evidence
    assert not tie.promoted and "not better by more than the noise" in tie.reason
    assert e.challenger and e.champion and e.challenger.k == e.champion.k == 3
    assert e.champion.std == pytest.approx(statistics.stdev([0.0903, 0.0921, 0.0885]))
    assert e.improvement == pytest.approx(0.0003, abs=1e-9)
    se = (e.challenger.std**2 / 3 + e.champion.std**2 / 3) ** 0.5
    assert e.standard_error == pytest.approx(se)
    assert 2.0 <= e.df <= 4.0  # Welch-Satterthwaite between k-1 and 2k-2
    assert e.margin == pytest.approx(student_t.ppf(0.95, e.df))
    assert e.threshold == pytest.approx(e.margin * se)
    assert f"{e.margin:.2f} standard errors" in tie.reason
    assert _champion(store).source_checkpoint_key == ckpt[1].key

    better = promote_if_better(store, cfg, _metrics([0.0700, 0.0712, 0.0690]), ckpt[3], NIGHTS[2])
    assert better.promoted and "better by more than the noise" in better.reason
    assert better.evidence.improvement > better.evidence.threshold
    champion = _champion(store)
    assert champion.source_checkpoint_key == ckpt[3].key and champion.night == NIGHTS[2]
    assert store.read_bytes(champion.checkpoint_key) == b"weights 3"  # a copy that outlives pruning
    assert champion.previous_key == layout.model_champion("default", 1)
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [d.promoted for d in history.decisions] == [True, False, True]
    assert history.decisions[-1] == better


def test_a_stricter_alpha_needs_a_larger_improvement(store):
    champion_fids, challenger_fids = [0.100, 0.104, 0.096], [0.092, 0.095, 0.089]
    promote_if_better(
        store, PromoteConfig(), _metrics(champion_fids), _checkpoint(store, 1), NIGHTS[0]
    )
    strict = PromoteConfig(alpha=0.001)
    d = promote_if_better(
        store, strict, _metrics(challenger_fids), _checkpoint(store, 2), NIGHTS[1]
    )
    assert not d.promoted and d.evidence.margin > 5  # t(0.999, ~4 df) ~ 7.2 standard errors
    d = promote_if_better(
        store, PromoteConfig(), _metrics(challenger_fids), _checkpoint(store, 2), NIGHTS[1]
    )
    assert d.promoted and d.evidence.margin < 3


def test_without_measured_noise_only_a_configured_margin_promotes(store):
    promote_if_better(store, PromoteConfig(), _metrics(5.0), _checkpoint(store, 1), NIGHTS[0])
    refused = promote_if_better(
        store, PromoteConfig(), _metrics(4.0), _checkpoint(store, 2), NIGHTS[1]
    )
    assert not refused.promoted
    assert refused.reason.startswith("noise not measured (evaluate.repeats=1)")
    assert "k=1" in refused.reason and "promote.min_improvement" in refused.reason

    margin = PromoteConfig(min_improvement=0.1)  # 10% of 5.0 = 0.5
    small = promote_if_better(store, margin, _metrics(4.6), _checkpoint(store, 3), NIGHTS[2])
    assert not small.promoted and small.evidence.threshold == pytest.approx(0.5)
    large = promote_if_better(store, margin, _metrics(4.0), _checkpoint(store, 4), NIGHTS[3])
    assert large.promoted and "noise not measured" in large.reason


def test_a_challenger_evaluated_differently_is_never_compared(store):
    cfg = PromoteConfig()
    fids = [5.0, 5.1, 4.9]
    promote_if_better(store, cfg, _metrics(fids), _checkpoint(store, 1), NIGHTS[0])
    much_better = [1.0, 1.01, 0.99]
    cases = {
        "feature extractor weights differ": _metrics(much_better, sha="b" * 64),
        "sample.steps: 50 -> 20": _metrics(much_better, steps=20),
        "seed_ranges": _metrics(
            much_better, seed_ranges=[(1000, 1256), (1256, 1512), (1512, 1768)]
        ),
        "repeats: 3 -> 2": _metrics([1.0, 1.01]),
    }
    for night, (expected, metrics) in zip(NIGHTS[1:], cases.items(), strict=False):
        d = promote_if_better(store, cfg, metrics, _checkpoint(store, 2), night)
        assert not d.promoted and "not comparable" in d.reason and expected in d.reason, d.reason
    assert _champion(store).metrics.fids == fids


def test_one_decision_per_night_and_a_rerun_replaces_it(store):
    cfg = PromoteConfig()
    promote_if_better(store, cfg, _metrics([5.0, 5.1, 4.9]), _checkpoint(store, 1), NIGHTS[0])
    # night 2 promotes, then its rerun does worse: the night's decision and its champion are undone
    first_try = promote_if_better(
        store, cfg, _metrics([3.0, 3.1, 2.9]), _checkpoint(store, 2), NIGHTS[1]
    )
    assert first_try.promoted and _champion(store).step == 2
    rerun = promote_if_better(
        store, cfg, _metrics([5.0, 5.2, 4.8]), _checkpoint(store, 3), NIGHTS[1]
    )
    assert not rerun.promoted
    assert rerun.evidence.champion_checkpoint_key == layout.checkpoint("r", 1)  # not night 2's own
    assert _champion(store).step == 1
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [(d.night, d.checkpoint_step) for d in history.decisions] == [
        (NIGHTS[0], 1),
        (NIGHTS[1], 3),
    ]


def test_rollback_restores_the_previous_champion_and_is_recorded(store):
    cfg = PromoteConfig()
    with pytest.raises(NothingToRollBackError, match="has no champion"):
        rollback(store, "default")
    promote_if_better(store, cfg, _metrics([5.0, 5.1, 4.9]), _checkpoint(store, 1), NIGHTS[0])
    with pytest.raises(NothingToRollBackError, match="no previous champion"):
        rollback(store, "default")
    promote_if_better(store, cfg, _metrics([3.0, 3.1, 2.9]), _checkpoint(store, 2), NIGHTS[1])
    promote_if_better(store, cfg, _metrics([1.0, 1.1, 0.9]), _checkpoint(store, 3), NIGHTS[2])

    event = rollback(store, "default")
    assert (event.from_step, event.to_step) == (3, 2)
    assert _champion(store).step == 2 and _champion(store).metrics.fid == pytest.approx(3.0)
    assert rollback(store, "default").to_step == 1  # and further back
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [(r.from_step, r.to_step) for r in history.rollbacks] == [(3, 2), (2, 1)]
    assert len(history.decisions) == 3  # rollbacks are not nights
    # the next night is weighed against the restored champion
    d = promote_if_better(store, cfg, _metrics([4.0, 4.1, 3.9]), _checkpoint(store, 4), NIGHTS[3])
    assert d.promoted and d.evidence.champion_checkpoint_key == layout.checkpoint("r", 1)


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
    store.write_json(layout.model_current("default"), {"format": "diffusion-pipeline/champion@1"})
    with pytest.raises(RecordFormatError, match="champion@1.*reads diffusion-pipeline/champion@2"):
        promote_if_better(store, PromoteConfig(), _metrics(5.0), _checkpoint(store, 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_evaluation_is_never_promoted(store, bad):
    decision = promote_if_better(store, PromoteConfig(), _metrics(bad), _checkpoint(store, 1))
    assert not decision.promoted and "not trustworthy" in decision.reason
    assert not store.exists(layout.model_current("default"))
    # and a later, sound model is promoted as the first one
    assert promote_if_better(store, PromoteConfig(), _metrics(5.0), _checkpoint(store, 2)).promoted


def test_an_evaluation_recorded_before_clip_x0_is_not_comparable_with_a_clipped_one():
    """Images sampled before `sample.clip_x0` existed were not clipped: reading such a record
    must not make it look like one made with today's default."""
    from tasks.promote.stage import incomparable_reasons

    new = _metrics([0.5, 0.52, 0.51])
    old_json = _metrics([0.6, 0.62, 0.61]).model_dump(mode="json")
    del old_json["sampling"]["clip_x0"]
    old = Metrics.model_validate(old_json)
    assert old.sampling.clip_x0 is False and new.sampling.clip_x0 is True
    assert "sample.clip_x0: False -> True" in incomparable_reasons(new, old)
