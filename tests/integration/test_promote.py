"""Promotion: only a comparable evaluation that is better by more than the measured noise replaces
the champion; one decision per night; the previous champion can be restored."""

from __future__ import annotations

import statistics

import pytest
from scipy.stats import t as student_t

from tasks import layout
from tasks.compare import paired_test, welch_test
from tasks.config import PromoteConfig, StorageConfig
from tasks.promote.stage import (
    DamagedChampionError,
    NothingToRollBackError,
    promote_if_better,
    read_champion,
    repair_champion,
    rollback,
)
from tasks.records import (
    Champion,
    Metrics,
    MetricSample,
    PromotionDecision,
    PromotionHistory,
    RecordFormatError,
)
from tasks.storage import Store
from tests.support.records import NIGHTS, checkpoint_record, metrics_record


@pytest.fixture
def store(tmp_path):
    return Store(StorageConfig(root=str(tmp_path)))


def _champion(store: Store) -> Champion:
    return Champion.read(store, layout.model_current("default"))


def test_promoted_only_when_better_by_more_than_the_noise(store):
    cfg = PromoteConfig()
    ckpt = {step: checkpoint_record(step, store) for step in (1, 2, 3)}
    first = promote_if_better(
        store, cfg, metrics_record([0.0903, 0.0921, 0.0885]), ckpt[1], NIGHTS[0]
    )
    assert first.promoted and "no model promoted yet" in first.reason

    # 0.0900 vs 0.0903 is no difference at this noise: the per-range differences disagree.
    tie = promote_if_better(
        store, cfg, metrics_record([0.0900, 0.0880, 0.0920]), ckpt[2], NIGHTS[1]
    )
    e = tie.evidence
    assert not tie.promoted and "not better by more than the noise" in tie.reason
    assert e.challenger and e.champion and e.challenger.k == e.champion.k == 3
    assert e.champion.std == pytest.approx(statistics.stdev([0.0903, 0.0921, 0.0885]))
    assert e.improvement == pytest.approx(0.0003, abs=1e-9)
    diffs = [0.0903 - 0.0900, 0.0921 - 0.0880, 0.0885 - 0.0920]
    se = statistics.stdev(diffs) / 3**0.5
    assert e.test == "paired" and e.df == 2
    assert e.standard_error == pytest.approx(se)
    assert e.margin == pytest.approx(student_t.ppf(0.95, 2))
    assert e.threshold == pytest.approx(e.margin * se)
    assert e.detectable == pytest.approx(e.threshold / statistics.fmean([0.0903, 0.0921, 0.0885]))
    assert f"{e.margin:.2f} standard errors" in tie.reason
    assert f"improvements below {100 * e.detectable:.2g} % are within the noise" in tie.reason
    assert "k = 3, n = 256" in tie.reason
    assert _champion(store).source_checkpoint_key == ckpt[1].key

    better = promote_if_better(
        store, cfg, metrics_record([0.0700, 0.0712, 0.0690]), ckpt[3], NIGHTS[2]
    )
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
        store,
        PromoteConfig(),
        metrics_record(champion_fids),
        checkpoint_record(1, store),
        NIGHTS[0],
    )
    strict = PromoteConfig(alpha=0.001)
    d = promote_if_better(
        store, strict, metrics_record(challenger_fids), checkpoint_record(2, store), NIGHTS[1]
    )
    assert not d.promoted and d.evidence.margin > 5  # t(0.999, 2 df) ~ 22 standard errors
    d = promote_if_better(
        store,
        PromoteConfig(),
        metrics_record(challenger_fids),
        checkpoint_record(2, store),
        NIGHTS[1],
    )
    assert d.promoted and d.evidence.margin < 3


def test_without_measured_noise_only_a_configured_margin_promotes(store):
    promote_if_better(
        store, PromoteConfig(), metrics_record(5.0), checkpoint_record(1, store), NIGHTS[0]
    )
    refused = promote_if_better(
        store, PromoteConfig(), metrics_record(4.0), checkpoint_record(2, store), NIGHTS[1]
    )
    assert not refused.promoted
    assert refused.reason.startswith("noise not measured (evaluate.repeats=1)")
    assert "k=1" in refused.reason and "promote.min_improvement" in refused.reason

    margin = PromoteConfig(min_improvement=0.1)  # 10% of 5.0 = 0.5
    small = promote_if_better(
        store, margin, metrics_record(4.6), checkpoint_record(3, store), NIGHTS[2]
    )
    assert not small.promoted and small.evidence.threshold == pytest.approx(0.5)
    large = promote_if_better(
        store, margin, metrics_record(4.0), checkpoint_record(4, store), NIGHTS[3]
    )
    assert large.promoted and "noise not measured" in large.reason


def test_a_challenger_evaluated_differently_is_never_compared(store):
    cfg = PromoteConfig()
    fids = [5.0, 5.1, 4.9]
    promote_if_better(store, cfg, metrics_record(fids), checkpoint_record(1, store), NIGHTS[0])
    much_better = [1.0, 1.01, 0.99]
    cases = {
        "feature extractor weights differ": metrics_record(much_better, sha="b" * 64),
        "sample.steps: 50 -> 20": metrics_record(much_better, steps=20),
        "seed_ranges": metrics_record(
            much_better, seed_ranges=[(1000, 1256), (1256, 1512), (1512, 1768)]
        ),
        "repeats: 3 -> 2": metrics_record([1.0, 1.01]),
    }
    for night, (expected, metrics) in zip(NIGHTS[1:], cases.items(), strict=False):
        d = promote_if_better(store, cfg, metrics, checkpoint_record(2, store), night)
        assert not d.promoted and "not comparable" in d.reason and expected in d.reason, d.reason
    assert _champion(store).metrics.fids == fids


def test_one_decision_per_night_and_a_rerun_replaces_it(store):
    cfg = PromoteConfig()
    promote_if_better(
        store, cfg, metrics_record([5.0, 5.1, 4.9]), checkpoint_record(1, store), NIGHTS[0]
    )
    # night 2 promotes, then its rerun does worse: the night's decision and its champion are undone
    first_try = promote_if_better(
        store, cfg, metrics_record([3.0, 3.1, 2.9]), checkpoint_record(2, store), NIGHTS[1]
    )
    assert first_try.promoted and _champion(store).step == 2
    rerun = promote_if_better(
        store, cfg, metrics_record([5.0, 5.2, 4.8]), checkpoint_record(3, store), NIGHTS[1]
    )
    assert not rerun.promoted
    assert rerun.evidence.champion_checkpoint_key == layout.checkpoint("r", 1)  # not night 2's own
    assert _champion(store).step == 1
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [(d.night, d.checkpoint_step) for d in history.decisions] == [
        (NIGHTS[0], 1),
        (NIGHTS[1], 3),
    ]


def test_an_older_nights_rerun_that_promotes_nothing_keeps_its_promotion_on_record(store):
    # Nights 1 and 2 promote; night 1 is rerun and loses to night 2's model; then night 2 is
    # rerun and loses to night 1's, which becomes the champion again: night 1's promoting
    # decision must still be on record (the order two concurrent reruns can take).
    cfg = PromoteConfig(min_improvement=0.01)
    x1 = promote_if_better(store, cfg, metrics_record(5.0), checkpoint_record(1, store), NIGHTS[0])
    y1 = promote_if_better(store, cfg, metrics_record(3.0), checkpoint_record(2, store), NIGHTS[1])
    x2 = promote_if_better(store, cfg, metrics_record(9.0), checkpoint_record(3, store), NIGHTS[0])
    y2 = promote_if_better(store, cfg, metrics_record(8.0), checkpoint_record(4, store), NIGHTS[1])
    assert (x1.promoted, y1.promoted, x2.promoted, y2.promoted) == (True, True, False, False)
    current = _champion(store)
    assert current.step == 1 and current.night == NIGHTS[0]
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [(d.night, d.checkpoint_step, d.promoted) for d in history.decisions] == [
        (NIGHTS[0], 1, True),
        (NIGHTS[1], 4, False),
    ]


def test_rollback_restores_the_previous_champion_and_is_recorded(store):
    cfg = PromoteConfig()
    with pytest.raises(NothingToRollBackError, match="has no champion"):
        rollback(store, "default")
    promote_if_better(
        store, cfg, metrics_record([5.0, 5.1, 4.9]), checkpoint_record(1, store), NIGHTS[0]
    )
    with pytest.raises(NothingToRollBackError, match="no previous champion"):
        rollback(store, "default")
    promote_if_better(
        store, cfg, metrics_record([3.0, 3.1, 2.9]), checkpoint_record(2, store), NIGHTS[1]
    )
    promote_if_better(
        store, cfg, metrics_record([1.0, 1.1, 0.9]), checkpoint_record(3, store), NIGHTS[2]
    )

    event = rollback(store, "default")
    assert (event.from_step, event.to_step) == (3, 2)
    assert _champion(store).step == 2 and _champion(store).metrics.fid == pytest.approx(3.0)
    assert rollback(store, "default").to_step == 1  # and further back
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [(r.from_step, r.to_step) for r in history.rollbacks] == [(3, 2), (2, 1)]
    assert len(history.decisions) == 3  # rollbacks are not nights
    # the next night is weighed against the restored champion
    d = promote_if_better(
        store, cfg, metrics_record([4.0, 4.1, 3.9]), checkpoint_record(4, store), NIGHTS[3]
    )
    assert d.promoted and d.evidence.champion_checkpoint_key == layout.checkpoint("r", 1)


def test_metric_missing_from_evaluation_is_a_clear_error(store):
    with pytest.raises(ValueError, match="evaluate.metrics"):
        promote_if_better(
            store,
            PromoteConfig(metric="kid"),
            metrics_record(5.0, kid=False),
            checkpoint_record(1, store),
        )


def test_a_damaged_checkpoint_is_never_promoted(store):
    ckpt = checkpoint_record(1, store)
    store.write_bytes(ckpt.key, b"weights 1 but changed")
    with pytest.raises(RecordFormatError, match="does not match its recorded sha256"):
        promote_if_better(store, PromoteConfig(), metrics_record(5.0), ckpt)
    assert not store.exists(layout.model_current("default"))


def test_a_champion_of_another_format_version_is_a_clear_error(store):
    store.write_json(layout.model_current("default"), {"format": "diffusion-pipeline/champion@1"})
    with pytest.raises(RecordFormatError, match="champion@1.*reads diffusion-pipeline/champion@2"):
        promote_if_better(store, PromoteConfig(), metrics_record(5.0), checkpoint_record(1, store))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_evaluation_is_never_promoted(store, bad):
    decision = promote_if_better(
        store, PromoteConfig(), metrics_record(bad), checkpoint_record(1, store)
    )
    assert not decision.promoted and "not trustworthy" in decision.reason
    assert not store.exists(layout.model_current("default"))
    # and a later, sound model is promoted as the first one
    assert promote_if_better(
        store, PromoteConfig(), metrics_record(5.0), checkpoint_record(2, store)
    ).promoted


def test_an_evaluation_recorded_before_clip_x0_is_not_comparable_with_a_clipped_one():
    """Images sampled before `sample.clip_x0` existed were not clipped: reading such a record
    must not make it look like one made with today's default."""
    from tasks.promote.rule import incomparable_reasons

    new = metrics_record([0.5, 0.52, 0.51])
    old_json = metrics_record([0.6, 0.62, 0.61]).model_dump(mode="json")
    del old_json["sampling"]["clip_x0"]
    old = Metrics.model_validate(old_json)
    assert old.sampling.clip_x0 is False and new.sampling.clip_x0 is True
    assert "sample.clip_x0: False -> True" in incomparable_reasons(new, old)


# The Quickstart's two nights (issue 17): night 2 was lower on every seed range, 17 % on average.
CHAMPION_FIDS = [0.1015, 0.1308, 0.1005]
CHALLENGER_FIDS = [0.0854, 0.1055, 0.0868]


def _champion_then_challenger(store: Store, cfg: PromoteConfig) -> PromotionDecision:
    """Night 1 promotes CHAMPION_FIDS; night 2 weighs CHALLENGER_FIDS under `cfg`."""
    promote_if_better(
        store,
        PromoteConfig(),
        metrics_record(CHAMPION_FIDS),
        checkpoint_record(1, store),
        NIGHTS[0],
    )
    return promote_if_better(
        store, cfg, metrics_record(CHALLENGER_FIDS), checkpoint_record(2, store), NIGHTS[1]
    )


def test_lower_on_every_shared_seed_range_is_promoted_by_the_paired_test(store):
    d = _champion_then_challenger(store, PromoteConfig())
    assert d.promoted and d.evidence.test == "paired", d.reason
    # The unpaired rule this replaced kept the champion on the same scores (p = 0.10).
    welch = welch_test(
        MetricSample.of(metrics_record(CHAMPION_FIDS), "fid"),
        MetricSample.of(metrics_record(CHALLENGER_FIDS), "fid"),
        alpha=0.05,
    )
    assert not welch.promote and welch.test == "welch"
    paired = paired_test(CHAMPION_FIDS, CHALLENGER_FIDS, alpha=0.05)
    t_stat = paired.improvement / paired.standard_error
    assert 1 - student_t.cdf(t_stat, 2) == pytest.approx(0.018, abs=0.001)


def test_min_improvement_still_raises_the_bar(store):
    d = _champion_then_challenger(store, PromoteConfig(min_improvement=0.25))
    assert not d.promoted and "promote.min_improvement 0.25 asks" in d.reason


def test_a_decision_recorded_before_the_paired_test_still_reads(store):
    promote_if_better(
        store,
        PromoteConfig(),
        metrics_record(CHAMPION_FIDS),
        checkpoint_record(1, store),
        NIGHTS[0],
    )
    key = layout.model_history("default")
    data = store.read_json(key)
    for decision in data["decisions"]:
        for field in ("test", "detectable"):
            decision["evidence"].pop(field, None)
    store.write_json(key, data)
    history = PromotionHistory.read(store, key)
    assert history.decisions[0].evidence.test is None and history.decisions[0].promoted


def _three_champions(store: Store) -> list[Champion]:
    """Nights 1-3 each promote a better model; returns the champions in order."""
    champions = []
    for night, (step, base) in enumerate([(1, 0.30), (2, 0.20), (3, 0.10)]):
        fids = [base + 0.001, base + 0.003, base]
        promote_if_better(
            store,
            PromoteConfig(),
            metrics_record(fids),
            checkpoint_record(step, store),
            NIGHTS[night],
        )
        champions.append(_champion(store))
    return champions


def test_a_damaged_champion_pointer_is_named_and_repaired_from_the_records(store):
    champions = _three_champions(store)
    key = layout.model_current("default")
    store.write_bytes(key, b"\x00 not json")
    with pytest.raises(DamagedChampionError, match="promote --repair"):
        read_champion(store, "default")
    with pytest.raises(DamagedChampionError):  # a rollback of a damaged pointer is refused too
        rollback(store, "default")
    restored = repair_champion(store, "default")
    assert restored == champions[-1] and _champion(store) == champions[-1]

    # After a rollback, the repaired pointer is the restored champion, not the newest record.
    rollback(store, "default")
    store.write_bytes(key, b"{")
    assert repair_champion(store, "default") == champions[1]

    # Without a readable history, the head of the records' chain.
    store.write_bytes(layout.model_history("default"), b"garbage")
    store.delete(key)
    assert repair_champion(store, "default") == champions[-1]


def test_repair_without_any_champion_record_changes_nothing(store):
    assert repair_champion(store, "default") is None
    assert not store.exists(layout.model_current("default"))
