"""What the store keeps and what it deletes: the pure rule (README: Retention). No store, no Ray:
it reads a listing and the records a survey gathered (`tasks.retention.stage.survey`) and returns
the plan, so `diffpipe gc --dry-run` shows exactly what `diffpipe gc` deletes.

Kept, whatever their age:
- every promoted model's champion record, `current.json` and `history.json`; the champion's
  checkpoint copy and those of its predecessors along the rollback chain (`retention.rollback_depth`
  of them; all when unset);
- the newest `train.keep_checkpoints` checkpoints of each run, and the one `latest.json` names;
- per run, the last `retention.keep_nights` nights (by stamp): their sample sets (shards, weights,
  features), evaluations and report images;
- the reference statistics of every dataset in use (a manifest's, a kept night's, a champion's);
- every dataset manifest and the shards it names;
- whatever this rule does not manage (run configs, training logs, post-hoc EMA snapshots, sweeps'
  and choices' reports, extractor weights, leases) and every key it does not recognise.

Deleted, once nothing in them was written for `retention.grace_hours`: the other sample sets with
their evaluations, checkpoints, checkpoint copies and reference statistics, shards no manifest
names, and the images of the older nights' reports (whose text is kept and says so). An artifact is
judged as a whole: a sample set with one fresh object keeps every object.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, get_args

from tasks import layout
from tasks.config import RetentionConfig
from tasks.records import Champion, Checkpoint, DatasetManifest, NightlySummary
from tasks.storage import StoredObject

Kind = Literal[
    "sample set",
    "evaluation",
    "report images",
    "checkpoint",
    "checkpoint copy",
    "reference statistics",
    "dataset shard",
    "unfinished write",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
# How a plan's summary counts each kind: (one, several).
_NOUNS: dict[Kind, tuple[str, str]] = {
    "sample set": ("sample set", "sample sets"),
    "evaluation": ("evaluation", "evaluations"),
    "report images": ("night's report images", "nights' report images"),
    "checkpoint": ("checkpoint", "checkpoints"),
    "checkpoint copy": ("champion's checkpoint copy", "champions' checkpoint copies"),
    "reference statistics": ("dataset's reference statistics", "datasets' reference statistics"),
    "dataset shard": ("dataset shard", "dataset shards"),
    "unfinished write": ("unfinished write", "unfinished writes"),
}


@dataclass(frozen=True)
class Survey:
    """The store as retention sees it: every object, and the records that say what is in use."""

    objects: list[StoredObject]
    nights: list[NightlySummary]  # every night's stored summary, of every run
    manifests: list[DatasetManifest]
    latest: dict[str, Checkpoint]  # run id -> its latest.json
    champions: dict[str, Champion]  # every champion record, by its key
    current: dict[str, Champion]  # model name -> its current.json
    unfinished: list[StoredObject] = field(default_factory=list)  # `Store.walk(unfinished=True)`


@dataclass(frozen=True)
class Deletion:
    key: str
    bytes: int
    kind: Kind
    why: str


@dataclass(frozen=True)
class RetentionPlan:
    """What to delete (in this order: a sample set's manifest last), and the nights whose report
    text is rewritten to say its images were pruned, before they are deleted."""

    deletions: list[Deletion]
    pruned_reports: list[NightlySummary]
    stored_bytes: int  # the whole store before

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.deletions)

    def describe(self) -> str:
        """'freed 12.3 MB of 40.1 MB stored: 3 sample sets (10.2 MB), 1 checkpoint (2.1 MB)'."""
        if not self.deletions:
            return f"nothing to delete ({size(self.stored_bytes)} stored)"
        units: dict[Kind, set[str]] = defaultdict(set)
        sizes: dict[Kind, int] = defaultdict(int)
        for d in self.deletions:
            units[d.kind].add(d.why)
            sizes[d.kind] += d.bytes
        parts = [
            f"{len(units[k])} {_NOUNS[k][len(units[k]) != 1]} ({size(sizes[k])})"
            for k in KINDS
            if k in units
        ]
        stored = f"freed {size(self.bytes)} of {size(self.stored_bytes)} stored"
        return f"{stored}: " + ", ".join(parts)


def size(n: int) -> str:
    """Bytes as a person reads them (decimal units, as storage is billed)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def pruned_note(when: datetime, keep_nights: int) -> str:
    """What a pruned report says in place of each image."""
    return (
        f"pruned by retention on {when:%Y-%m-%d}: images and samples are kept for the last "
        f"retention.keep_nights={keep_nights} nights"
    )


def below(prefix: str, key: str) -> str | None:
    """The name of the file or folder directly below the folder `prefix` that holds `key`, or
    None when `key` is not below it."""
    if not key.startswith(prefix + "/"):
        return None
    return key[len(prefix) + 1 :].split("/", 1)[0]


def names_below(prefix: str, objects: Iterable[StoredObject]) -> list[str]:
    """The names directly below `prefix` (`below`) that a key part may be, sorted."""
    return sorted({n for o in objects if (n := below(prefix, o.key)) and valid_part(n)})


def valid_part(value: str) -> bool:
    try:
        layout.part(value, "name")
    except ValueError:
        return False
    return True


def _chain(current: Champion, champions: dict[str, Champion]) -> list[Champion]:
    """The champion, then each one it replaced, as far as their records go."""
    chain, seen = [current], {current.key}
    while chain[-1].previous_key is not None and chain[-1].previous_key not in seen:
        previous = champions.get(chain[-1].previous_key)
        if previous is None:
            break
        chain.append(previous)
        seen.add(previous.key)
    return chain


class _Planner:
    """One pass over a survey: units of objects kept or deleted, each with its reason."""

    def __init__(
        self, survey: Survey, policy: RetentionConfig, keep_checkpoints: int, now: datetime
    ):
        self.survey, self.policy, self.keep_checkpoints = survey, policy, keep_checkpoints
        self.cutoff = now - timedelta(hours=policy.grace_hours)
        self.objects = {o.key: o for o in survey.objects}
        self.deletions: list[Deletion] = []

    def fresh(self, objects: Iterable[StoredObject]) -> bool:
        """Something in it was written within the grace period: a job may still be using it."""
        return any(o.written > self.cutoff for o in objects)

    def delete(self, objects: Iterable[StoredObject], kind: Kind, why: str) -> None:
        self.deletions += [Deletion(o.key, o.bytes, kind, why) for o in objects]

    def below(self, prefix: str) -> list[StoredObject]:
        return [o for key, o in self.objects.items() if key.startswith(prefix + "/")]

    # -- per run: nights, sample sets and evaluations, checkpoints ---------------------------
    def kept_nights(self, run_id: str) -> tuple[list[NightlySummary], list[NightlySummary]]:
        """(kept, older) nights of the run: the last `keep_nights` by stamp are kept."""
        nights = sorted(
            (n for n in self.survey.nights if n.run_id == run_id), key=lambda n: n.stamp
        )
        cut = max(len(nights) - self.policy.keep_nights, 0)
        return nights[cut:], nights[:cut]

    def run(self, run_id: str) -> list[NightlySummary]:
        kept, older = self.kept_nights(run_id)
        self.sample_sets(run_id, kept)
        self.checkpoints(run_id, kept)
        return [night for night in older if self.report_images(night)]

    def sample_sets(self, run_id: str, kept: list[NightlySummary]) -> None:
        """A sample set and its evaluation (same name) go together, kept while a kept night
        evaluated it."""
        keep = {n.metrics.sample_set for n in kept}
        samples_root, evals_root = layout.sample_sets_prefix(run_id), layout.evals_prefix(run_id)
        names = {below(samples_root, k) for k in self.objects} | {
            below(evals_root, k) for k in self.objects
        }
        for name in sorted(n for n in names if n is not None and n not in keep):
            if not valid_part(name):
                continue
            samples = self.below(layout.sample_set_prefix(run_id, name))
            evaluation = self.below(layout.eval_prefix(run_id, name))
            if self.fresh(samples + evaluation):
                continue
            why = f"sample set {name} of run {run_id}: no kept night evaluated it"
            # The manifest last: an interrupted deletion never leaves a set that reads complete.
            manifest = layout.sample_manifest(layout.sample_set_prefix(run_id, name))
            ordered = sorted(samples, key=lambda o: o.key == manifest)
            self.delete(evaluation, "evaluation", why)
            self.delete(ordered, "sample set", why)

    def checkpoints(self, run_id: str, kept: list[NightlySummary]) -> None:
        """The newest `train.keep_checkpoints` (by step: keys sort by step, as training prunes),
        the latest, and the kept nights' ones (trained to, and evaluated)."""
        prefix = layout.checkpoints_prefix(run_id)
        files = sorted(
            (o for o in self.objects.values() if below(prefix, o.key) and o.key.endswith(".pt")),
            key=lambda o: o.key,
        )
        latest = self.survey.latest.get(run_id)
        keep = {o.key for o in files[-self.keep_checkpoints :]}
        keep |= {n.checkpoint_key for n in kept} | {n.metrics.checkpoint_key for n in kept}
        keep |= {latest.key} if latest else set()
        for o in files:
            if o.key not in keep and not self.fresh([o]):
                why = f"checkpoint {o.key}: older than the run's last {self.keep_checkpoints}"
                self.delete([o], "checkpoint", why)

    def report_images(self, night: NightlySummary) -> bool:
        """An older night's figures; True when there are any to prune (its text is rewritten)."""
        prefix = layout.nightly_prefix(night.run_id, night.stamp)
        figures = [
            self.objects[key]
            for key in (layout.nightly_figure(prefix, f) for f in get_args(layout.NightlyFigure))
            if key in self.objects
        ]
        if not figures or self.fresh(self.below(prefix)):
            return False
        why = f"report images of night {night.stamp} of run {night.run_id}"
        self.delete(figures, "report images", why)
        return True

    # -- the store's shared folders --------------------------------------------------------
    def champion_copies(self) -> None:
        """Copies of champions that are neither the champion nor within `rollback_depth` of it
        along the rollback chain (none with the depth unset)."""
        depth = self.policy.rollback_depth
        if depth is None:
            return
        keep: set[str] = set()
        for current in self.survey.current.values():
            keep |= {c.checkpoint_key for c in _chain(current, self.survey.champions)[: depth + 1]}
        for record in self.survey.champions.values():
            copy = self.objects.get(record.checkpoint_key)
            if copy is None or copy.key in keep or self.fresh([copy]):
                continue
            why = (
                f"checkpoint copy of model {record.model_name!r} step {record.step}: more than "
                f"{depth} champion(s) back"
            )
            self.delete([copy], "checkpoint copy", why)

    def fingerprints_in_use(self, kept_nights: list[NightlySummary]) -> set[str]:
        s = self.survey
        return (
            {m.fingerprint for m in s.manifests}
            | {n.metrics.dataset_fingerprint for n in kept_nights}
            | {c.metrics.dataset_fingerprint for c in s.current.values()}
        )

    def reference_stats(self, in_use: set[str]) -> None:
        by_dataset: dict[str, list[StoredObject]] = defaultdict(list)
        for o in self.objects.values():
            fingerprint = below(layout.stats_root(), o.key)
            if fingerprint is not None and fingerprint not in in_use:
                by_dataset[fingerprint].append(o)
        for fingerprint, objects in sorted(by_dataset.items()):
            if not self.fresh(objects):
                why = f"reference statistics of dataset {fingerprint}: no dataset in use"
                self.delete(objects, "reference statistics", why)

    def dataset_shards(self) -> None:
        """Shards in a shard set's folder that its manifest no longer names (the source changed)."""
        named = {
            shard.key
            for m in self.survey.manifests
            for split in m.splits.values()
            for shard in split.shards
        }
        for prefix in sorted({m.prefix for m in self.survey.manifests}):
            for o in self.below(prefix):
                if o.key.endswith(".tar") and o.key not in named and not self.fresh([o]):
                    why = f"dataset shard {o.key}: its manifest no longer names it"
                    self.delete([o], "dataset shard", why)

    def unfinished_writes(self) -> None:
        """The temporary files of writes whose writer was killed before its rename (a local
        store's `.tmp-*`): no reader sees them, nothing else removes them."""
        for o in self.survey.unfinished:
            if not self.fresh([o]):
                self.delete([o], "unfinished write", f"{o.key}: a write that never finished")


def plan(
    survey: Survey, policy: RetentionConfig, keep_checkpoints: int, now: datetime
) -> RetentionPlan:
    """What to delete from a store that holds `survey`, at time `now` (timezone-aware), under
    `policy` and training's `keep_checkpoints`."""
    planner = _Planner(survey, policy, keep_checkpoints, now)
    pruned: list[NightlySummary] = []
    kept_nights: list[NightlySummary] = []
    runs = set(names_below(layout.runs_root(), survey.objects)) | {n.run_id for n in survey.nights}
    for run_id in sorted(runs):
        pruned += planner.run(run_id)
        kept_nights += planner.kept_nights(run_id)[0]
    planner.champion_copies()
    planner.reference_stats(planner.fingerprints_in_use(kept_nights))
    planner.dataset_shards()
    planner.unfinished_writes()
    protected = _protected(survey)
    assert not protected & {d.key for d in planner.deletions}, "retention planned a kept object"
    return RetentionPlan(
        deletions=planner.deletions,
        pruned_reports=pruned,
        stored_bytes=sum(o.bytes for o in [*survey.objects, *survey.unfinished]),
    )


def _protected(survey: Survey) -> set[str]:
    """What no policy deletes: the champions' checkpoint copies and records, manifests, and the
    checkpoints the runs' latest.json name (an internal invariant of `plan`)."""
    keys = {layout.dataset_manifest(m.prefix) for m in survey.manifests}
    keys |= {c.checkpoint_key for c in survey.current.values()}
    keys |= set(survey.champions) | {c.key for c in survey.current.values()}
    keys |= {c.key for c in survey.latest.values()}
    return keys
