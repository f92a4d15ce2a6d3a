"""The retention rule, pure: a listing and records in, the deletions out (no store, no Ray)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tasks import layout
from tasks.config import DataConfig, RetentionConfig
from tasks.records import (
    Champion,
    DatasetManifest,
    NightlySummary,
    PromotionDecision,
    PromotionEvidence,
    ShardInfo,
    SplitInfo,
)
from tasks.report.document import (
    Document,
    Image,
    Section,
    Text,
    html_without_images,
    markdown_without_images,
    render_html,
    render_markdown,
)
from tasks.retention.rule import RetentionPlan, Survey, plan
from tasks.storage import StoredObject
from tests.support.records import NIGHTS, checkpoint_record, metrics_record

NOW = datetime(2026, 12, 1, tzinfo=UTC)
OLD = NOW - timedelta(days=10)
RUN, FP, SHA = "r", "fp0", "a" * 64
POLICY = RetentionConfig(keep_nights=2, grace_hours=24)


def _set(step: int) -> str:
    return layout.sample_set_name(step, "ddim", 2, "abc")


def _night(i: int) -> tuple[NightlySummary, list[str]]:
    """Night i's summary (checkpoint step 10 i) and the keys it left (samples, evaluation, report)."""
    step, stamp = 10 * i, NIGHTS[i]
    samples, evals = layout.sample_set_prefix(RUN, _set(step)), layout.eval_prefix(RUN, _set(step))
    ckpt = checkpoint_record(step, run_id=RUN)
    metrics = metrics_record([0.1, 0.2]).model_copy(
        update={
            "sample_set": _set(step),
            "samples_key": layout.sample_manifest(samples),
            "checkpoint_key": ckpt.key,
            "dataset_fingerprint": FP,
            "reference_stats_key": layout.reference_stats(FP, SHA, 180),
        }
    )
    decision = PromotionDecision(
        promoted=False,
        reason="-",
        night=stamp,
        model_name="default",
        metric="fid",
        value=0.15,
        checkpoint_key=ckpt.key,
        checkpoint_step=step,
        decided_at=stamp,
        evidence=PromotionEvidence(challenger=None, alpha=0.05),
    )
    prefix = layout.nightly_prefix(RUN, stamp)
    summary = NightlySummary(
        run_id=RUN,
        stamp=stamp,
        dataset="digits",
        manifest_key="m",
        shards_reused=True,
        step=step,
        resumed_from=step - 10,
        trained_steps=10,
        checkpoint_key=ckpt.key,
        samples_key=metrics.samples_key,
        metrics=metrics,
        promotion=decision,
        stages=[],
        report_key=layout.nightly_report(prefix),
        report_html_key=layout.nightly_report_html(prefix),
        report_url="file:///x",
    )
    keys = [
        layout.sample_manifest(samples),
        layout.sample_shard(samples, 0),
        layout.sample_receipt(samples, 0),
        layout.sample_weights(samples),
        layout.sample_features(samples, SHA, 0),
        layout.eval_metrics(evals),
        layout.eval_grid(evals),
        layout.eval_report(evals),
        layout.nightly_report(prefix),
        layout.nightly_report_html(prefix),
        layout.nightly_summary(prefix),
        *(layout.nightly_figure(prefix, f) for f in ("grid", "loss", "fid")),
    ]
    return summary, keys


def _champion(step: int, previous: int | None) -> Champion:
    return Champion(
        model_name="default",
        step=step,
        checkpoint_key=layout.model_checkpoint("default", step),
        source_checkpoint_key=layout.checkpoint(RUN, step),
        metrics=metrics_record([0.1, 0.2]),
        promoted_at="2026-11-01T00:00:00+00:00",
        previous_key=None if previous is None else layout.model_champion("default", previous),
    )


def _survey(nights: int = 4, extra: dict[str, datetime] | None = None, **records) -> Survey:
    keys: dict[str, datetime] = {}
    summaries = []
    for i in range(1, nights + 1):
        summary, written = _night(i)
        summaries.append(summary)
        keys |= dict.fromkeys(written, OLD)
        keys[layout.checkpoint(RUN, 10 * i)] = OLD
    keys |= dict.fromkeys(
        [
            layout.run_config(RUN),
            layout.latest_checkpoint(RUN),
            layout.train_history(RUN),
            layout.extractor("standin.pth"),
            layout.phema_snapshot(RUN, 0.05, 10),
            layout.reference_stats(FP, SHA, 180),
        ],
        OLD,
    )
    keys |= extra or {}
    objects = [StoredObject(k, 100, t) for k, t in sorted(keys.items())]
    latest = {RUN: checkpoint_record(10 * nights, run_id=RUN)}
    return Survey(
        objects=objects,
        nights=records.get("summaries", summaries),
        manifests=records.get("manifests", []),
        latest=latest,
        champions=records.get("champions", {}),
        current=records.get("current", {}),
    )


def _plan(survey: Survey, policy: RetentionConfig = POLICY, keep: int = 1) -> RetentionPlan:
    return plan(survey, policy, keep, NOW)


def _deleted(p: RetentionPlan) -> set[str]:
    return {d.key for d in p.deletions}


def test_the_last_nights_keep_their_samples_evaluations_and_report_images() -> None:
    survey = _survey(nights=4)
    p = _plan(survey)
    old = set(_night(1)[1] + _night(2)[1])
    text = {k for i in (1, 2) for k in _night(i)[1] if k.endswith((".md", ".html", "summary.json"))}
    text -= {layout.eval_report(layout.eval_prefix(RUN, _set(10 * i))) for i in (1, 2)}
    assert _deleted(p) - {layout.checkpoint(RUN, s) for s in (10, 20, 30)} == old - text
    assert not _deleted(p) & set(_night(3)[1] + _night(4)[1])
    assert [n.stamp for n in p.pruned_reports] == [NIGHTS[1], NIGHTS[2]]
    # a sample set's manifest goes last: an interrupted deletion never leaves a set that reads whole
    keys = [d.key for d in p.deletions]
    manifest = layout.sample_manifest(layout.sample_set_prefix(RUN, _set(10)))
    assert all(keys.index(manifest) > keys.index(k) for k in _night(1)[1][1:5])
    assert p.bytes == 100 * len(p.deletions)
    assert p.describe().startswith(f"freed {p.bytes / 1000:.1f} kB of")
    assert "2 sample sets" in p.describe() and "2 nights' report images" in p.describe()


def test_what_the_rule_does_not_manage_is_kept() -> None:
    p = _plan(_survey(nights=4))
    for key in (
        layout.run_config(RUN),
        layout.latest_checkpoint(RUN),
        layout.train_history(RUN),
        layout.extractor("standin.pth"),
        layout.phema_snapshot(RUN, 0.05, 10),
        layout.reference_stats(FP, SHA, 180),  # of the dataset the kept nights used
    ):
        assert key not in _deleted(p), key


def test_nothing_written_within_the_grace_period_is_deleted() -> None:
    samples = layout.sample_set_prefix(RUN, _set(10))
    fresh = {layout.sample_receipt(samples, 0): NOW - timedelta(hours=1)}
    p = _plan(_survey(nights=4, extra=fresh))
    assert not {k for k in _deleted(p) if k.startswith(samples)}  # the set as a whole
    assert not {k for k in _deleted(p) if k.startswith(layout.eval_prefix(RUN, _set(10)))}
    assert layout.sample_manifest(layout.sample_set_prefix(RUN, _set(20))) in _deleted(p)
    # past the grace period it goes
    assert layout.sample_manifest(samples) in _deleted(
        _plan(_survey(nights=4, extra=fresh), POLICY.model_copy(update={"grace_hours": 0.5}))
    )


def test_checkpoints_the_last_n_the_latest_and_the_kept_nights() -> None:
    p = _plan(_survey(nights=4), keep=1)
    # night 3 and 4 are kept (their checkpoints too); steps 10 and 20 go
    deleted = {k for k in _deleted(p) if k.startswith(layout.checkpoints_prefix(RUN))}
    assert deleted == {layout.checkpoint(RUN, 10), layout.checkpoint(RUN, 20)}
    wide = _plan(_survey(nights=4), RetentionConfig(keep_nights=1, grace_hours=0), keep=3)
    assert {k for k in _deleted(wide) if k.startswith(layout.checkpoints_prefix(RUN))} == {
        layout.checkpoint(RUN, 10)
    }


def test_the_champion_and_its_rollback_chain_are_kept() -> None:
    chain = {c.key: c for c in (_champion(10, None), _champion(20, 10), _champion(30, 20))}
    orphan = _champion(25, 20)  # promoted, then rolled back from
    records = {**chain, orphan.key: orphan}
    copies = {c.checkpoint_key: OLD for c in records.values()} | dict.fromkeys(records, OLD)
    current = {"default": chain[layout.model_champion("default", 30)]}
    for depth, kept in ((None, {10, 20, 25, 30}), (1, {20, 30}), (5, {10, 20, 30})):
        policy = POLICY.model_copy(update={"rollback_depth": depth})
        p = _plan(_survey(extra=copies, champions=records, current=current), policy)
        deleted = {k for k in _deleted(p) if k.startswith(layout.models_root())}
        expected = {layout.model_checkpoint("default", s) for s in (10, 20, 25, 30)}
        assert deleted == expected - {layout.model_checkpoint("default", s) for s in kept}, depth
        assert not deleted & set(records)  # champion records are kept, always


def test_reference_statistics_of_datasets_no_longer_in_use_go() -> None:
    gone, manifest_fp = layout.reference_stats("fp-old", SHA, 180), "fp-manifest"
    extra = {gone: OLD, layout.reference_stats(manifest_fp, SHA, 50): OLD}
    manifest = _manifest(manifest_fp, ["a", "b"])
    p = _plan(_survey(extra=extra, manifests=[manifest]))
    assert {k for k in _deleted(p) if k.startswith(layout.stats_root())} == {gone}


def _manifest(fingerprint: str, chunks: list[str]) -> DatasetManifest:
    prefix = layout.dataset_prefix("digits", "0123456789abcdef")
    shards = [
        ShardInfo(key=layout.dataset_shard(prefix, "train", c * 16), count=1, sha256="0", bytes=1)
        for c in chunks
    ]
    return DatasetManifest(
        dataset="digits",
        source="digits",
        shard_set="0123456789abcdef",
        fingerprint=fingerprint,
        source_fingerprint="s",
        image_size=8,
        channels=1,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        splits={"train": SplitInfo(count=2, shards=shards)},
        config=DataConfig(),
        created="2026-11-01T00:00:00+00:00",
    )


def test_shards_no_manifest_names_go_the_manifest_and_its_shards_stay() -> None:
    manifest = _manifest(FP, ["a", "b"])
    orphan = layout.dataset_shard(manifest.prefix, "train", "c" * 16)
    extra = {s.key: OLD for s in manifest.splits["train"].shards}
    extra |= {orphan: OLD, manifest.key: OLD}
    p = _plan(_survey(extra=extra, manifests=[manifest]))
    assert {k for k in _deleted(p) if k.startswith(layout.datasets_root())} == {orphan}


def test_a_store_without_old_nights_loses_nothing() -> None:
    p = _plan(_survey(nights=2))
    assert p.deletions == [] and p.pruned_reports == []
    assert p.describe() == f"nothing to delete ({p.stored_bytes / 1000:.1f} kB stored)"


def test_a_pruned_page_reads_as_if_rendered_without_its_images() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    note = "pruned by retention on 2026-12-01"
    blocks = [Text("before"), Image("grid", png, "samples <8x8>", "none"), Text("after")]
    doc = Document("t", [], [Section("s", "S", [*blocks, Image("loss", png, "loss", "-")])])
    gone = Document(
        "t",
        [],
        [
            Section(
                "s",
                "S",
                [
                    Text("before"),
                    Image("grid", None, "samples <8x8>", f"samples <8x8>: {note}"),
                    Text("after"),
                    Image("loss", None, "loss", f"loss: {note}"),
                ],
            )
        ],
    )
    assert markdown_without_images(render_markdown(doc), note) == render_markdown(gone)
    assert html_without_images(render_html(doc), note) == render_html(gone)
