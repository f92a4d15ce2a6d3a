"""Training resumes exactly: N steps, stop, resume to 2N equals 2N steps in one go (same process
code path the Ray workers run, world size 1), and every rank gets shards."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from diffusion_core.checkpoint import load_checkpoint
from tasks import layout
from tasks.config import ConfigError, StorageConfig
from tasks.records import Checkpoint, DatasetManifest, ShardInfo, TrainHistory
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.data import (
    RankBatches,
    hflip_mask,
    load_batches,
    shards_for_rank,
    stream_samples,
)
from tasks.train.log import SCALARS
from tasks.train.loop import DivergedError, TrainJob, run_training
from tasks.train.stage import train
from tests.support.config import LONGER_TRAINING, tiny_config
from tests.support.training import assert_same_training_state, final_state

# Dropout on: a resumed run must also restore the random state that draws its masks.
DROPOUT = {"model": {"dropout": 0.1}}
# Post-hoc EMA on: its power EMAs resume exactly too, and their snapshots match.
PHEMA = {"phema_sigma_rels": [0.05, 0.1], "phema_every": 2}


def _job(
    store: Store, manifest: DatasetManifest, target: int, run_id: str, **train: object
) -> TrainJob:
    cfg = tiny_config(
        store.config.root, LONGER_TRAINING, DROPOUT, {"train": {"run_id": run_id, **train}}
    )
    return TrainJob(config=cfg, target_step=target, manifest=manifest)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    store = Store(StorageConfig(root=str(tmp_path_factory.mktemp("store"))))
    return store, shard_dataset(tiny_config(None, LONGER_TRAINING).data, store).manifest


def _latest(store: Store, run_id: str) -> Checkpoint:
    latest = Checkpoint.latest(store, run_id)
    assert latest is not None
    return latest


def test_resume_is_exact(sharded):
    store, manifest = sharded
    run_training(_job(store, manifest, 6, "straight", **PHEMA))
    run_training(_job(store, manifest, 3, "resumed", **PHEMA))
    summary = run_training(_job(store, manifest, 6, "resumed", **PHEMA))
    assert summary.resumed_from == 3 and summary.checkpoint.step == 6
    assert summary.trained_steps == 3 and summary.checkpoint == _latest(store, "resumed")
    assert summary.loss is not None and math.isfinite(summary.loss) and summary.loss > 0

    a, b = final_state(store, "straight"), final_state(store, "resumed")
    assert a["step"] == b["step"] == 6
    assert_same_training_state(a, b)
    assert a["phema"]["step"] == 6
    # The snapshots of both runs (every 2 steps, and at each attempt's last step) agree.
    snapshots = {
        run: {
            layout.phema_snapshot_of(run, k): k
            for k in store.list(layout.phema_snapshots_prefix(run))
        }
        for run in ("straight", "resumed")
    }
    steps = {2, 4, 6}
    assert set(snapshots["straight"]) == {(s, t) for s in (0.05, 0.1) for t in steps}
    assert set(snapshots["resumed"]) == {(s, t) for s in (0.05, 0.1) for t in steps | {3}}
    for which, key in snapshots["straight"].items():
        same = load_checkpoint(store.read_bytes(snapshots["resumed"][which]))
        _same_weights(load_checkpoint(store.read_bytes(key))["model"], same["model"])
    assert (
        a["config"]["unet"]["image_size"] == 8
        and a["config"]["dataset"]["fingerprint"] == manifest.fingerprint
    )
    # old checkpoints are pruned to keep_checkpoints, latest stays
    kept = [k for k in store.list(layout.checkpoints_prefix("straight")) if k.endswith(".pt")]
    assert kept[-1].endswith("step-00000006.pt") and len(kept) <= 3

    # The history spans both attempts and matches the straight run's window for window.
    straight, resumed = _history(store, "straight"), _history(store, "resumed")
    assert [(w.step, w.loss, w.lr) for w in resumed] == [(w.step, w.loss, w.lr) for w in straight]
    assert [w.step for w in straight] == [3, 6]
    for w in straight:
        assert 0 <= w.data_wait <= 1 and w.images_per_s > 0 and w.seconds > 0
        assert w.grad_norm is not None and w.grad_norm > 0
    # TensorBoard shows the same numbers, from the event files in the store.
    assert _tensorboard(store, "resumed") == {
        tag: [(w.step, pytest.approx(getattr(w, field), rel=1e-6)) for w in resumed]
        for field, tag in SCALARS.items()
    }


def test_post_hoc_ema_turned_on_mid_run_starts_there_and_keeps_its_widths(sharded, caplog):
    """A run resumed with train.phema_sigma_rels set starts its power EMAs at the resumed step
    (said in a warning); resuming with other widths is refused, naming both."""
    store, manifest = sharded
    run_training(_job(store, manifest, 3, "late"))
    with caplog.at_level(logging.WARNING, logger="tasks.train.loop"):
        run_training(_job(store, manifest, 6, "late", **PHEMA))
    assert "resumes at step 3 from a checkpoint without power EMAs" in caplog.text
    assert final_state(store, "late")["phema"]["step"] == 6
    assert store.exists(layout.phema_snapshot("late", 0.1, 4))
    assert not store.exists(layout.phema_snapshot("late", 0.1, 2))
    other = {**PHEMA, "phema_sigma_rels": [0.05, 0.07]}
    with pytest.raises(ConfigError, match=r"sigma_rel \[0.05, 0.1\]; .*=\[0.05, 0.07\] now"):
        run_training(_job(store, manifest, 9, "late", **other))


def test_a_rewound_run_replaces_the_lost_windows(sharded):
    """Pointing latest.json back at an earlier checkpoint (README: a damaged checkpoint) makes the
    windows after it a lost attempt: the history and TensorBoard show only the new ones."""
    store, manifest = sharded
    run_training(_job(store, manifest, 4, "rewound", log_every=1))
    lost = {w.step: w for w in _history(store, "rewound")}
    earlier = layout.checkpoint("rewound", 3)
    Checkpoint.latest(store, "rewound").model_copy(  # type: ignore[union-attr]
        update={"step": 3, "key": earlier, "sha256": store.sha256(earlier)}
    ).write(store, layout.latest_checkpoint("rewound"))
    run_training(_job(store, manifest, 4, "rewound", log_every=1, lr=1e-2))  # another lr
    history = _history(store, "rewound")
    assert [w.step for w in history] == [1, 2, 3, 4]
    assert history[:3] == [lost[1], lost[2], lost[3]]
    assert history[3].lr == 1e-2 and lost[4].lr != 1e-2
    assert _tensorboard(store, "rewound")["train/lr"] == [
        (w.step, pytest.approx(w.lr, rel=1e-6)) for w in history
    ]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _history(store: Store, run_id: str) -> list:
    return TrainHistory.read(store, layout.train_history(run_id)).windows


def _tensorboard(store: Store, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run as TensorBoard reads its folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = store.list(layout.tensorboard_prefix(run_id))
    assert files and all(".tfevents." in k for k in files)
    events = EventAccumulator(store.path(layout.tensorboard_prefix(run_id)))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_batches_are_the_same_whatever_the_data_workers_and_start(sharded):
    """Batch i depends on (seed, rank, step) only: not on the number of background data workers
    nor on where the stream (re)started; flips mirror exactly the images their mask names."""
    store, manifest = sharded

    def batches(start: int, workers: int, hflip: bool, n: int) -> list:
        dataset = RankBatches(
            storage=store.config,
            shards=manifest.split("train").shards,
            rank=1,
            world_size=2,
            seed=5,
            shuffle_buffer=16,
            batch_size=8,
            channels=manifest.channels,
            start_step=start,
            hflip=hflip,
        )
        stream = load_batches(dataset, workers, torch.device("cpu"))
        out = [next(stream) for _ in range(n)]
        stream.close()
        return out

    inline = batches(0, 0, True, 9)  # crosses an epoch (54 images per rank)
    for got in (batches(0, 2, True, 9), batches(4, 3, True, 5)[:5]):
        expected = inline[-len(got) :]
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(got, expected, strict=True)
        )
    plain = batches(0, 0, False, 9)
    flipped = 0
    for step, ((images, labels), (raw, raw_labels)) in enumerate(zip(inline, plain, strict=True)):
        mask = torch.from_numpy(hflip_mask(5, 1, step, 8))
        assert torch.equal(labels, raw_labels)
        assert torch.equal(images[mask], raw[mask].flip(-1))
        assert torch.equal(images[~mask], raw[~mask])
        flipped += int(mask.sum())
    assert 0 < flipped < 72


def test_training_changes_weights_and_nothing_to_do_when_done(sharded):
    store, manifest = sharded
    run_training(_job(store, manifest, 3, "fresh"))
    before = final_state(store, "fresh")
    torch.manual_seed(0)
    from diffusion_core.unet import UNet, UNetConfig

    init = UNet(UNetConfig.from_dict(before["config"]["unet"])).state_dict()
    assert any(not torch.equal(init[k], before["model"][k]) for k in init)

    latest = _latest(store, "fresh")
    stamp = store.fs.info(store.path(latest.key))["mtime"]
    again = run_training(_job(store, manifest, 3, "fresh"))  # already there: no step, no write
    assert again.resumed_from == 3 and again.trained_steps == 0 and again.loss is None
    assert _latest(store, "fresh") == latest
    assert store.fs.info(store.path(latest.key))["mtime"] == stamp


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_gets_shards(n_shards, world):
    shards = [ShardInfo(key=f"s{i}", count=10, sha256="0" * 64, bytes=1) for i in range(n_shards)]
    for epoch in range(3):
        dealt = [shards_for_rank(shards, r, world, epoch, seed=0) for r in range(world)]
        assert all(dealt), dealt
        if n_shards >= world:  # a partition: every shard once
            assert sorted(s.key for d in dealt for s in d) == sorted(s.key for s in shards)


def test_stream_skip_equals_reading_past(sharded):
    store, manifest = sharded
    shards = manifest.split("train").shards

    def keys(skip: int, n: int) -> list[str]:
        it = stream_samples(store, shards, 0, 1, seed=3, shuffle_buffer=16, skip=skip)
        return [next(it)["__key__"] for _ in range(n)]

    full = keys(0, 250)  # crosses an epoch boundary (108 train images)
    assert keys(130, 120) == full[130:]
    assert len(set(full[:108])) == 108  # an epoch visits each image once


def test_a_diverged_run_stops_and_saves_nothing(sharded):
    store, manifest = sharded
    run_training(_job(store, manifest, 3, "diverge"))
    good = _latest(store, "diverge")
    with pytest.raises(DivergedError, match=r"run 'diverge' diverged: .*(step [4-6]|after step 6)"):
        run_training(_job(store, manifest, 6, "diverge", lr=1e38, grad_clip=None))
    assert _latest(store, "diverge") == good  # latest still points at the last good checkpoint
    names = [k.rsplit("/", 1)[-1] for k in store.list(layout.checkpoints_prefix("diverge"))]
    assert names == ["latest.json", "step-00000003.pt"]
    weights = load_checkpoint(good.read_bytes(store))["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_an_incompatible_resume_fails_before_anything_is_written(sharded):
    store, manifest = sharded
    run_training(_job(store, manifest, 3, "shape"))
    store.write_text(layout.run_config("shape"), "the run's own config")
    before = _latest(store, "shape")
    shape = _job(store, manifest, 3, "shape").config
    wider = shape.model_copy(update={"model": shape.model.model_copy(update={"base_channels": 16})})
    for target in (3, 6):  # also when the target step is already reached
        cfg = wider.model_copy(update={"train": wider.train.model_copy(update={"steps": target})})
        with pytest.raises(ValueError, match=r"base_channels: 8 in the run, 16 now") as err:
            train(cfg, store, manifest)
        assert "another train.run_id" in str(err.value)
    assert store.read_bytes(layout.run_config("shape")) == b"the run's own config"
    assert _latest(store, "shape") == before
