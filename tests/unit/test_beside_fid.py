"""The metrics beside FID, pure (no Ray, no S3): precision/recall are torch-fidelity's own, the
memorization share means what the README says, old metrics records read as before, and the
promotion rule refuses a model that memorizes. FD-DINOv2: the skip line, and the whole path on a
tiny stand-in network given as local hub code (the real DINOv2 code and weights are not here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import calculate_precision_recall_part, prc_features_to_metric

from tasks import layout
from tasks.config import DataConfig, EvalConfig, PromoteConfig, SampleConfig, StorageConfig
from tasks.evaluate.dinov2 import fd_dinov2_fields, skip_reason
from tasks.evaluate.neighbours import (
    memorization_threshold,
    memorized_share,
    nearest_distances,
    precision_recall,
)
from tasks.promote.rule import decide, memorization_refusal
from tasks.records import DatasetManifest, Metrics, SampleSet, SampleShard, SplitInfo
from tasks.storage import Store
from tasks.webdata import encode_png, write_shard
from tests.support.records import checkpoint_record, metrics_record


def _features(seed: int, n: int, shift: float = 0.0, d: int = 16) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, d)) + shift).astype(np.float32)


def _brute_force_prc(fake: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 from the definition, in numpy float64."""

    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = a.astype(np.float64), b.astype(np.float64)
        return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0))

    radius_real = np.sort(dist(real, real), axis=1)[:, k]  # k-th neighbour, self excluded
    radius_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = (dist(fake, real) <= radius_real[None, :]).any(axis=1).mean()
    recall = (dist(real, fake) <= radius_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("shift", [0.0, 0.7, 3.0])
def test_precision_recall_equal_torch_fidelitys_own(shift: float) -> None:
    fake, real = _features(1, 90, shift), _features(2, 70)
    ours = precision_recall(fake, real)
    assert ours is not None
    theirs = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), verbose=False)
    assert ours == (theirs["precision"], theirs["recall"])
    # torch-fidelity's other code path (save_cpu_ram) and the definition agree too
    part = calculate_precision_recall_part(torch.from_numpy(fake), torch.from_numpy(real), 3, 32)
    assert ours == pytest.approx(part)
    assert ours == pytest.approx(_brute_force_prc(fake, real), abs=1.5 / 70)


def test_precision_recall_fall_as_the_sets_part() -> None:
    same = precision_recall(_features(1, 80), _features(2, 80))
    apart = precision_recall(_features(1, 80, shift=3.0), _features(2, 80))
    assert same is not None and apart is not None
    assert same[0] > 0.5 and same[1] > 0.5 and apart[0] < 0.1 and apart[1] < 0.1


def test_precision_recall_need_more_points_than_the_neighbourhood() -> None:
    assert precision_recall(_features(1, 3), _features(2, 50)) is None


def test_nearest_distances_match_brute_force() -> None:
    x, train = _features(3, 50), _features(4, 5000)  # two blocks of training features
    brute = np.sqrt(((x[:, None].astype(np.float64) - train[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nearest_distances(x, train), brute, rtol=1e-9)


def test_memorized_share_is_the_quantile_for_fresh_samples_and_one_for_copies() -> None:
    train, holdout = _features(5, 2000), _features(6, 2000)
    tau = memorization_threshold(holdout, train, 0.05)
    fresh = memorized_share(_features(7, 2000), train, tau)
    assert fresh == pytest.approx(0.05, abs=0.02)  # about q: as near as held-out images are
    copies = train[:100] + np.float32(1e-4)  # a model reproducing its training images
    assert memorized_share(copies, train, tau) == 1.0
    assert memorized_share(_features(8, 200, shift=2.0), train, tau) == 0.0  # far from the data


# -- the record ------------------------------------------------------------------------------------
def test_metrics_written_before_these_fields_read_as_before() -> None:
    new = metrics_record([0.1, 0.12, 0.11]).model_copy(
        update={"precisions": [0.5], "memorized_share": 0.04, "skipped": ["x"]}
    )
    old = new.model_dump(mode="json")
    added = ["precisions", "recalls", "precision", "recall", "memorized_shares"]
    added += ["memorized_share", "memorization_threshold", "memorization_quantile"]
    added += ["num_training_images", "fd_dinov2s", "fd_dinov2", "fd_dinov2_std"]
    added += ["dinov2_weights_sha256", "skipped"]
    for name in added:
        del old[name]
    read = Metrics.parse(old, "old metrics.json")
    assert read.fids == new.fids and read.memorized_share is None and read.precisions == []
    assert read.skipped == [] and "precision" not in read.scores()
    assert Metrics.parse(new.model_dump(mode="json"), "new") == new


# -- the promotion rule ----------------------------------------------------------------------------
def _memorizing(share: float | None) -> Metrics:
    return metrics_record([0.1, 0.12, 0.11]).model_copy(
        update={"memorized_share": share, "memorization_quantile": 0.05}
    )


def test_the_default_bar_refuses_only_a_memorizing_model() -> None:
    cfg = PromoteConfig()
    assert memorization_refusal(_memorizing(None), cfg) is None  # not measured
    assert memorization_refusal(_memorizing(0.06), cfg) is None  # a model that does not memorize
    assert memorization_refusal(_memorizing(0.5), cfg) is None
    reason = memorization_refusal(_memorizing(0.9), cfg)
    assert reason is not None and "90.0%" in reason and "promote.max_memorized_share 0.5" in reason
    assert memorization_refusal(_memorizing(0.2), PromoteConfig(max_memorized_share=0.1))


def test_decide_refuses_a_memorizing_model_even_as_the_first() -> None:
    ckpt = checkpoint_record(1)
    promoted, reason, evidence = decide(PromoteConfig(), _memorizing(1.0), ckpt, None)
    assert not promoted and reason.startswith("memorization: 100.0% of the samples")
    assert evidence.memorized_share == 1.0 and evidence.max_memorized_share == 0.5
    promoted, reason, _ = decide(PromoteConfig(), _memorizing(0.05), ckpt, None)
    assert promoted and reason.startswith("no model promoted yet")


# -- FD-DINOv2 -------------------------------------------------------------------------------------
def test_fd_dinov2_without_weights_is_skipped_with_one_line() -> None:
    assert skip_reason(EvalConfig()) is None  # not asked for: nothing to say
    line = skip_reason(EvalConfig(metrics=("fid", "fd_dinov2")))
    assert line is not None and "\n" not in line
    assert line.startswith("FD-DINOv2 skipped: evaluate.dinov2_weights is not set")
    assert "nothing is downloaded" in line


_HUBCONF = '''
import torch


class Tiny(torch.nn.Module):
    """A stand-in for DINOv2 ViT-S/14: average pool 224 -> 4, then a linear map to 6 dims."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 6)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def dinov2_vits14(pretrained=True):
    assert not pretrained, "nothing may be downloaded"
    return Tiny()
'''


def test_fd_dinov2_with_local_code_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole path (weights from a path, hub code from torch.hub's folder, torch-fidelity's
    preprocessing, FD per repeat) on a tiny stand-in network: cheap, and nothing downloaded."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    code = tmp_path / "hub" / "facebookresearch_dinov2_main"
    code.mkdir(parents=True)
    (code / "hubconf.py").write_text(_HUBCONF)
    torch.manual_seed(0)
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({"proj.weight": torch.randn(6, 48), "proj.bias": torch.zeros(6)}, weights)

    store = Store(StorageConfig(root=str(tmp_path / "store")))
    rng = np.random.default_rng(0)
    holdout = rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8)
    near = np.clip(holdout[:6].astype(int) + rng.integers(-5, 6, (6, 1, 28, 28)), 0, 255)
    far = np.zeros((6, 1, 28, 28), np.uint8)  # repeat 1: black images
    dataset, samples = _dataset_and_samples(store, holdout, [near.astype(np.uint8), far])
    cfg = EvalConfig(metrics=("fd_dinov2",), dinov2_weights=str(weights), repeats=2, batch_size=5)
    assert skip_reason(cfg) is None
    fields = fd_dinov2_fields(store, cfg, dataset, samples, num_reference=12)
    fds = fields.get("fd_dinov2s")
    assert fds is not None and len(fds) == 2 and fds[0] < fds[1]  # the near repeat scores lower
    assert fields.get("dinov2_weights_sha256") and fields.get("fd_dinov2_std") is not None


def _dataset_and_samples(
    store: Store, holdout: np.ndarray, repeats: list[np.ndarray]
) -> tuple[DatasetManifest, SampleSet]:
    """A held-out split of one shard and a sample set of one shard per repeat, on local disk."""
    ds = layout.dataset_prefix("mnist", "fp")
    rows = (
        {"__key__": f"{j:06d}", "png": encode_png(im[0]), "cls": 0} for j, im in enumerate(holdout)
    )
    held = write_shard(store, layout.dataset_shard(ds, "holdout", "0" * 16), rows)
    dataset = DatasetManifest(
        dataset="mnist",
        source="mnist",
        shard_set="fp",
        fingerprint="fp",
        source_fingerprint="0" * 64,
        image_size=28,
        channels=1,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        splits={"holdout": SplitInfo(count=len(holdout), shards=[held])},
        config=DataConfig(dataset="mnist"),
        created="2026-11-25T00:00:00+00:00",
    )
    prefix = layout.sample_set_prefix("r", "step-00000001-ddim-50-abc")
    shards, n = [], len(repeats[0])
    for j, images in enumerate(repeats):
        rows = (
            {"__key__": f"{j * n + i:08d}", "png": encode_png(im[0])} for i, im in enumerate(images)
        )
        info = write_shard(store, layout.sample_shard(prefix, j), rows)
        shards.append(
            SampleShard(
                key=info.key,
                count=info.count,
                sha256=info.sha256,
                bytes=info.bytes,
                seed_start=j * n,
                seed_stop=(j + 1) * n,
            )
        )
    samples = SampleSet(
        name="step-00000001-ddim-50-abc",
        run_id="r",
        checkpoint=checkpoint_record(1),
        weights_key=layout.sample_weights(prefix),
        weights="ema",
        num_images=n,
        repeats=len(repeats),
        image_size=28,
        channels=1,
        shards=shards,
        config=SampleConfig(num_images=n),
        created="2026-11-25T00:00:00+00:00",
    )
    return dataset, samples
