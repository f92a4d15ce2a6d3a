"""The evaluate task on real MNIST digits, a real S3 server (moto, loopback) and the seeded stand-in
extractor (the standard Inception weights cannot be downloaded here).

InceptionV3 on CPU is the cost (~11 images/s on 2 idle cores): the extractor, the store and the
extracted features are module-scoped and image counts are small.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.fid import feature_moments, frechet_distance, kernel_inception_distance
from diffusion_core.unet import UNetConfig
from tasks import layout
from tasks.config import DataConfig, EvalConfig, SampleConfig, StorageConfig
from tasks.evaluate.features import KID_SUBSETS
from tasks.evaluate.inception import (
    STANDARD_FILENAME,
    ExtractorInfo,
    extract_features,
    load_extractor,
    resolve_extractor,
)
from tasks.evaluate.reference import reference_features
from tasks.evaluate.scoring import evaluate_samples
from tasks.npz import read_npz
from tasks.records import (
    DatasetManifest,
    Metrics,
    SampleSet,
    SampleShard,
    SplitInfo,
)
from tasks.report.stage import write_evaluation_report
from tasks.storage import Store
from tasks.webdata import encode_png, write_shard
from tests.support.paths import read_idx
from tests.support.records import checkpoint_record
from tests.support.s3 import free_port

N_PER_SET = 64  # images per FID set in the separation test
N_HOLDOUT = 24
N_SAMPLES = 16
N_REPEAT = 8  # images per repeat in the distributed test
FINGERPRINT = "mnist-test-0123abcd"

pytestmark = pytest.mark.slow  # an S3 server process and ~230 InceptionV3 forward passes


def _unreachable_url() -> str:
    """A loopback URL nothing listens on: the standard download fails at once, online or not."""
    return f"http://127.0.0.1:{free_port()}/{STANDARD_FILENAME}"


@pytest.fixture(scope="module")
def store(s3_endpoint: str) -> Store:
    import boto3

    bucket = f"eval-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    return Store(StorageConfig(root=f"s3://{bucket}/pipeline", endpoint_url=s3_endpoint))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("extractor-cache")


@pytest.fixture(scope="module")
def standin(store: Store, cache_dir: Path) -> ExtractorInfo:
    return resolve_extractor(
        EvalConfig(), store, cache_dir=cache_dir, standard_url=_unreachable_url()
    )


@pytest.fixture(scope="module")
def mnist(mnist_root: Path) -> np.ndarray:
    """The MNIST test images as uint8 [10000, 1, 28, 28], decoded from the IDX file."""
    images = read_idx(mnist_root / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10_000, 28, 28), images.shape
    return images[:, None].copy()


@pytest.fixture(scope="module")
def fids(mnist: np.ndarray, standin: ExtractorInfo) -> dict[str, float]:
    noise = np.random.default_rng(0).integers(0, 256, (N_PER_SET, 1, 28, 28), dtype=np.uint8)
    sets = {"real_a": mnist[:N_PER_SET], "real_b": mnist[N_PER_SET : 2 * N_PER_SET], "noise": noise}
    moments = {
        name: feature_moments(extract_features(images, standin, batch_size=32)["2048"])
        for name, images in sets.items()
    }
    result = {
        "real_vs_real": frechet_distance(*moments["real_a"], *moments["real_b"]),
        "real_vs_noise": frechet_distance(*moments["real_a"], *moments["noise"]),
    }
    print(f"\nstand-in FID with {N_PER_SET} images per set: {result}")
    return result


def _write_dataset(store: Store, images: np.ndarray) -> DatasetManifest:
    prefix = layout.dataset_prefix("mnist", FINGERPRINT)
    half = len(images) // 2
    shards = []
    for i, part in enumerate((images[:half], images[half:])):
        samples = (
            {"__key__": f"{i}-{j:06d}", "png": encode_png(img[0]), "cls": 0}
            for j, img in enumerate(part)
        )
        shards.append(
            write_shard(store, layout.dataset_shard(prefix, "holdout", f"{i:016x}"), samples)
        )
    manifest = DatasetManifest(
        dataset="mnist",
        source="mnist",
        shard_set=FINGERPRINT,
        fingerprint=FINGERPRINT,
        source_fingerprint="0" * 64,
        image_size=28,
        channels=1,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        splits={"holdout": SplitInfo(count=len(images), shards=shards)},
        config=DataConfig(dataset="mnist"),
        created="2026-11-25T00:00:00+00:00",
    )
    manifest.write(store, manifest.key)
    return manifest


@pytest.fixture(scope="module")
def dataset_manifest(store: Store, mnist: np.ndarray) -> DatasetManifest:
    return _write_dataset(store, mnist[1000 : 1000 + N_HOLDOUT])


# (a) the metric measures something -------------------------------------------------------------
def test_fid_separates_real_digits_from_noise(fids: dict[str, float]) -> None:
    assert fids["real_vs_real"] < 0.2 * fids["real_vs_noise"], fids


# (b) the stand-in is He-initialised, not PyTorch's default init (whose features vanish) ----------
def test_standin_is_he_initialised_and_discriminates(
    standin: ExtractorInfo, fids: dict[str, float]
) -> None:
    assert not standin.standard and "STAND-IN" in standin.label
    assert fids["real_vs_noise"] > 1e-3  # PyTorch's default init gives ~1e-12 here
    model = load_extractor(standin)
    conv = model.Conv2d_1a_3x3.conv.weight  # fan_in = 3 * 3 * 3
    assert float(conv.std()) == pytest.approx((2.0 / 27) ** 0.5, rel=0.1)
    assert torch.all(model.Conv2d_1a_3x3.bn.weight == 1) and torch.all(
        model.Mixed_7c.branch_pool.bn.running_var == 1
    )


def test_standin_is_shared_through_the_store(
    store: Store, standin: ExtractorInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = layout.extractor("inception-v3-standin-seed0.pth")
    assert key in store.list(layout.extractors_prefix())
    assert store.sha256(key) == standin.sha256
    # Another worker with an empty local cache gets the same bytes from the store.
    with caplog.at_level(logging.WARNING, logger="tasks.evaluate.inception"):
        again = resolve_extractor(
            EvalConfig(), store, cache_dir=tmp_path, standard_url=_unreachable_url()
        )
    assert again.sha256 == standin.sha256 and again.path.parent == tmp_path
    assert "STAND-IN" in caplog.text and "NOT comparable" in caplog.text


# (c) reference statistics are computed once and cached in the store -----------------------------
def test_reference_stats_cached_in_store(
    store: Store, dataset_manifest: DatasetManifest, standin: ExtractorInfo
) -> None:
    cfg = EvalConfig(batch_size=32, repeats=1)
    key = layout.reference_stats(FINGERPRINT, standin.sha256, N_HOLDOUT)
    assert key == f"stats/{FINGERPRINT}/{standin.sha256[:16]}-n{N_HOLDOUT}.npz"
    if store.exists(key):
        store.delete(key)

    first = reference_features(store, dataset_manifest, standin, cfg)
    # The second call reads the stored statistics, not the images: it needs no shard.
    shard = dataset_manifest.split("holdout").shards[0].key
    shard_bytes = store.read_bytes(shard)
    store.delete(shard)
    try:
        second = reference_features(store, dataset_manifest, standin, cfg)
    finally:
        store.write_bytes(shard, shard_bytes)

    assert first.computed and not second.computed
    assert first.key == second.key == key
    assert store.list(layout.reference_stats_prefix(FINGERPRINT)) == [key]
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert second.features.shape == (N_HOLDOUT, 2048) and second.features.dtype == np.float32
    with np.load(io.BytesIO(store.read_bytes(key)), allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
    assert meta["extractor_sha256"] == standin.sha256 and meta["dataset_fingerprint"] == FINGERPRINT


# (d) no silent stand-in when the user asks for the standard weights ---------------------------
@pytest.mark.timeout(120, func_only=True)  # a guard: the download must not be retried for long
def test_missing_weights_error_says_how_to_provide_them(store: Store, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"evaluate\.inception_weights=PATH") as err:
        resolve_extractor(
            EvalConfig(on_missing_weights="error"),
            store,
            cache_dir=tmp_path,
            standard_url=_unreachable_url(),
        )
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value)


def test_configured_weights_path_that_does_not_exist(store: Store, tmp_path: Path) -> None:
    cfg = EvalConfig(inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resolve_extractor(cfg, store, cache_dir=tmp_path)


# (e) a malicious weights file is refused without running it ------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("fmt", ["torch.save file", "raw pickle in S3"])
def test_malicious_weights_file_is_refused_unexecuted(
    store: Store, tmp_path: Path, fmt: str
) -> None:
    # The payload is live: plain unpickling runs it (checked on a control marker).
    control = tmp_path / "control-ran"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.is_dir()

    marker = tmp_path / "payload-ran"
    if fmt == "torch.save file":
        weights = tmp_path / "evil.pth"
        torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, weights)
        location = str(weights)
    else:
        key = f"uploads/{uuid.uuid4().hex[:8]}/evil.pth"
        store.write_bytes(key, pickle.dumps({"w": _Payload(marker)}, protocol=2))
        location = store.url(key)

    info = resolve_extractor(EvalConfig(inception_weights=location), store, cache_dir=tmp_path)
    assert not info.standard and info.source == location
    with pytest.raises(ValueError, match="refusing Inception weights file .*evil.pth"):
        load_extractor(info)
    assert not marker.exists()


# (f) the task end to end on tiny shards in S3 ---------------------------------------------------
def _write_samples(
    store: Store, images: np.ndarray, channels: int = 1, repeats: int = 1
) -> SampleSet:
    """`images` as a sample set of `repeats` repeats, two shards per repeat (seed i = image i)."""
    name = f"step-00000600-ddim-50-{uuid.uuid4().hex[:8]}"
    prefix = layout.sample_set_prefix("nightly", name)
    per = len(images) // repeats
    bounds = [
        b
        for j in range(repeats)
        for b in ((j * per, j * per + per // 2), (j * per + per // 2, (j + 1) * per))
    ]
    shards = []
    for i, (lo, hi) in enumerate(bounds):
        samples = (
            {
                "__key__": f"{seed:08d}",
                "png": encode_png(images[seed, 0]),
                "json": {"seed": seed, "label": None},
            }
            for seed in range(lo, hi)
        )
        info = write_shard(store, layout.sample_shard(prefix, i), samples)
        shards.append(
            SampleShard(
                key=info.key,
                count=info.count,
                sha256=info.sha256,
                bytes=info.bytes,
                seed_start=lo,
                seed_stop=hi,
            )
        )
    checkpoint = checkpoint_record(
        600,
        run_id="nightly",
        unet=UNetConfig(in_channels=channels, image_size=28, attention_resolutions=(7,)),
        dataset_fingerprint=FINGERPRINT,
    )
    sample_set = SampleSet(
        name=name,
        run_id="nightly",
        checkpoint=checkpoint,
        weights_key=layout.sample_weights(prefix),
        weights="ema",
        num_images=per,
        repeats=repeats,
        image_size=28,
        channels=channels,
        shards=shards,
        config=SampleConfig(num_images=per, sampler="ddim", steps=50),
        created="2026-11-25T00:00:00+00:00",
    )
    sample_set.write(store, sample_set.key)
    return sample_set


def test_evaluate_samples_end_to_end(
    store: Store,
    dataset_manifest: DatasetManifest,
    standin: ExtractorInfo,
    mnist: np.ndarray,
) -> None:
    # "Samples": real digits with pixel noise, so the FID is small but not zero.
    rng = np.random.default_rng(1)
    digits = mnist[2000 : 2000 + N_SAMPLES].astype(np.int16)
    samples = np.clip(digits + rng.integers(-40, 41, digits.shape), 0, 255).astype(np.uint8)
    sample_set = _write_samples(store, samples)
    cfg = EvalConfig(
        metrics=("fid", "kid", "isc"), kid_subset_size=8, grid_images=16, batch_size=32, repeats=1
    )

    metrics = evaluate_samples(store, dataset_manifest, sample_set, cfg, extractor=standin)
    markdown = write_evaluation_report(store, metrics, sample_set, cfg.grid_images)

    assert metrics.prefix == layout.eval_prefix("nightly", sample_set.name)
    for key in (metrics.key, metrics.grid_key, metrics.report_key):
        assert store.exists(key), key
    assert Metrics.read(store, metrics.key) == metrics  # what is stored is what was returned
    assert metrics.num_images == N_SAMPLES and metrics.num_reference_images == N_HOLDOUT
    assert metrics.extractor.weights_sha256 == standin.sha256
    assert metrics.extractor.standard is False and metrics.comparable_with_published is False
    assert metrics.fid is not None and metrics.fid > 0
    assert metrics.kid_mean is not None and np.isfinite(metrics.kid_mean)
    assert metrics.isc_mean is not None and metrics.isc_mean >= 1.0
    assert metrics.reference_stats_key == layout.reference_stats(
        FINGERPRINT, standin.sha256, N_HOLDOUT
    )
    assert (metrics.sampling.sampler, metrics.sampling.steps, metrics.checkpoint_step) == (
        "ddim",
        50,
        600,
    )
    assert metrics.dataset_fingerprint == FINGERPRINT and metrics.kid_subset_size == 8

    report = store.read_bytes(metrics.report_key).decode()
    assert report == markdown
    assert "NOT comparable with published FIDs" in report and "grid.png" in report
    with Image.open(io.BytesIO(store.read_bytes(metrics.grid_key))) as grid:
        assert grid.width >= 256 and grid.width == grid.height  # 16 images: a 4 x 4 grid
    shown = {k: round(getattr(metrics, k), 6) for k in ("fid", "kid_mean", "isc_mean")}
    print(f"\nend-to-end metrics ({N_SAMPLES} samples vs {N_HOLDOUT} held-out): {shown}")

    # One repeat: its FID, seed range and provenance; no noise estimate from a single range.
    assert (metrics.repeats, metrics.fids, metrics.fid_std) == (1, [metrics.fid], None)
    assert metrics.kids == [metrics.kid_mean] and metrics.kid_mean_std is None
    assert metrics.seed_ranges == [(0, N_SAMPLES)] and metrics.weights == "ema"
    p = metrics.provenance
    assert p is not None and p.device == "cpu" and p.torch == torch.__version__
    assert p.torch_fidelity and p.package_version and p.git_commit  # this is a git checkout
    for text in (p.git_commit, p.torch_fidelity, f"0..{N_SAMPLES - 1}", "| weights | ema |"):
        assert text in report, text
    # The shards' features are kept: re-evaluating extracts nothing and gives the same numbers.
    kept = [layout.sample_features(sample_set.prefix, standin.sha256, n) for n in (0, 1)]
    stamps = [store.fs.info(store.path(k))["LastModified"] for k in kept]
    again = evaluate_samples(store, dataset_manifest, sample_set, cfg, extractor=standin)
    assert [store.fs.info(store.path(k))["LastModified"] for k in kept] == stamps
    assert (again.fid, again.kid_mean, again.isc_mean) == (
        metrics.fid,
        metrics.kid_mean,
        metrics.isc_mean,
    )


def test_evaluate_samples_rejects_channel_mismatch(
    store: Store, dataset_manifest: DatasetManifest, standin: ExtractorInfo
) -> None:
    rgb = _write_samples(store, np.zeros((4, 1, 28, 28), np.uint8), channels=3)
    with pytest.raises(ValueError, match=r"\(channels, size\) = \(3, 28\)"):
        evaluate_samples(store, dataset_manifest, rgb, EvalConfig(repeats=1), extractor=standin)


def test_degenerate_samples_are_flagged_and_never_promoted(
    store: Store, dataset_manifest: DatasetManifest, standin: ExtractorInfo, tmp_path: Path
) -> None:
    from tasks.config import PromoteConfig
    from tasks.promote.stage import promote_if_better

    black = _write_samples(store, np.zeros((8, 1, 28, 28), np.uint8))  # a diverged model's output
    cfg = EvalConfig(metrics=("fid",), grid_images=8, batch_size=8, repeats=1)
    metrics = evaluate_samples(store, dataset_manifest, black, cfg, extractor=standin)
    assert metrics.problems == ["all 8 samples are flat images (a single pixel value each)"]
    assert "NOT TRUSTWORTHY" in write_evaluation_report(store, metrics, black, cfg.grid_images)
    own = Store(StorageConfig(root=str(tmp_path)))
    ckpt_bytes = b"weights"
    ckpt = black.checkpoint.model_copy(
        update={"key": "runs/nightly/checkpoints/step-00000600.pt", "sha256": _sha(ckpt_bytes)}
    )
    own.write_bytes(ckpt.key, ckpt_bytes)
    decision = promote_if_better(own, PromoteConfig(), metrics, ckpt)
    assert not decision.promoted and "not trustworthy: all 8 samples are flat" in decision.reason


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# (g) distributed: shards on Ray workers, FID from merged moments, repeats ------------------------
def test_distributed_fid_equals_single_process_fid_per_repeat(
    store: Store,
    dataset_manifest: DatasetManifest,
    standin: ExtractorInfo,
    mnist: np.ndarray,
    ray_cluster: None,
) -> None:
    from tasks.config import RayConfig
    from tasks.evaluate.stage import RayPool

    images = mnist[3000 : 3000 + 2 * N_REPEAT]  # two repeats, two shards each
    sample_set = _write_samples(store, images, repeats=2)
    cfg = EvalConfig(repeats=2, kid_subset_size=6, batch_size=8, workers=2)
    pool = RayPool(store, cfg, RayConfig(), standin, channels=1, units=4)
    try:
        assert len(pool.actors) == 2
        m = evaluate_samples(store, dataset_manifest, sample_set, cfg, pool=pool, extractor=standin)
    finally:
        pool.close()
    ref = reference_features(store, dataset_manifest, standin, cfg)  # cached by now
    assert not ref.computed
    single = [
        extract_features(images[j * N_REPEAT : (j + 1) * N_REPEAT], standin, batch_size=32)["2048"]
        for j in range(2)
    ]
    fids = [frechet_distance(*feature_moments(f), ref.mu, ref.sigma) for f in single]
    assert m.fids == pytest.approx(fids, rel=1e-6)
    assert m.fid == pytest.approx(float(np.mean(fids)), rel=1e-6)
    assert m.fid_std == pytest.approx(float(np.std(fids, ddof=1)), rel=1e-5)
    kids = [
        kernel_inception_distance(f, ref.features, 6, KID_SUBSETS, seed=2020)[0] for f in single
    ]
    assert m.kids == pytest.approx(kids, rel=1e-6, abs=1e-12)
    assert m.repeats == 2 and m.seed_ranges == [(0, N_REPEAT), (N_REPEAT, 2 * N_REPEAT)]
    assert m.num_images == N_REPEAT and m.provenance is not None and m.provenance.device == "cpu"
    # every shard's features are in the store, under the extractor's sha256
    for n in range(4):
        assert store.exists(layout.sample_features(sample_set.prefix, standin.sha256, n))
    report = write_evaluation_report(store, m, sample_set, cfg.grid_images)
    assert "± " in report and f"{N_REPEAT}..{2 * N_REPEAT - 1}" in report
    print(f"\nper-repeat FIDs (2 x {N_REPEAT} images, 2 workers): {m.fids}, std {m.fid_std:.3g}")


# (h) a damaged cache is named, computed again and overwritten --------------------------------------
def test_damaged_caches_are_recomputed_and_the_fid_is_unchanged(
    store: Store,
    dataset_manifest: DatasetManifest,
    standin: ExtractorInfo,
    mnist: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sample_set = _write_samples(store, mnist[4000:4008])
    cfg = EvalConfig(metrics=("fid",), batch_size=8, repeats=1)
    stats = layout.reference_stats(FINGERPRINT, standin.sha256, N_HOLDOUT)
    features = layout.sample_features(sample_set.prefix, standin.sha256, 0)
    store.delete(stats)  # both runs compute the statistics with this configuration
    intact = evaluate_samples(store, dataset_manifest, sample_set, cfg, extractor=standin)
    for key in (stats, features):
        data = bytearray(store.read_bytes(key))
        data[len(data) // 3] ^= 0x01  # one bit, inside an array's data
        store.write_bytes(key, bytes(data))

    with caplog.at_level(logging.WARNING):
        again = evaluate_samples(store, dataset_manifest, sample_set, cfg, extractor=standin)

    assert intact.fid is not None and again.fid == intact.fid
    for key, names in ((stats, ("features", "mu", "sigma")), (features, ("2048",))):
        assert f"{store.url(key)} are damaged" in caplog.text, key
        read_npz(store, key, names)  # overwritten: it reads back whole


# (i) beside FID: precision/recall, memorization, FD-DINOv2's skip; a memorizing model refused ----
def test_metrics_beside_fid_and_a_memorizing_model_is_refused(
    store: Store,
    dataset_manifest: DatasetManifest,
    standin: ExtractorInfo,
    mnist: np.ndarray,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from torch_fidelity.metric_prc import prc_features_to_metric

    from tasks.config import PromoteConfig
    from tasks.promote.stage import promote_if_better
    from tasks.records import PromotionHistory

    # The same held-out split (its cached reference reused) plus a training split of 16 digits.
    training = mnist[5000:5016]
    prefix = layout.dataset_prefix("mnist", FINGERPRINT)
    rows = (
        {"__key__": f"t-{j:06d}", "png": encode_png(img[0]), "cls": 0}
        for j, img in enumerate(training)
    )
    shard = write_shard(store, layout.dataset_shard(prefix, "train", "f" * 16), rows)
    splits = {**dataset_manifest.splits, "train": SplitInfo(count=len(training), shards=[shard])}
    dataset = dataset_manifest.model_copy(update={"splits": splits})
    memorizing = _write_samples(store, training)  # "samples" that are the training images
    cfg = EvalConfig(metrics=("fid", "prc", "memorization", "fd_dinov2"), batch_size=16, repeats=1)

    with caplog.at_level(logging.WARNING, logger="tasks.evaluate.scoring"):
        m = evaluate_samples(store, dataset, memorizing, cfg, extractor=standin)
    report = write_evaluation_report(store, m, memorizing, cfg.grid_images)

    assert Metrics.read(store, m.key) == m
    assert len(m.precisions) == len(m.recalls) == 1 and m.precision == m.precisions[0]
    kept = [layout.sample_features(memorizing.prefix, standin.sha256, n) for n in (0, 1)]
    samples = np.concatenate([read_npz(store, k, ["2048"]).arrays["2048"] for k in kept])
    ref = reference_features(store, dataset, standin, cfg)
    theirs = prc_features_to_metric(torch.from_numpy(samples), torch.from_numpy(ref.features))
    assert (m.precision, m.recall) == (theirs["precision"], theirs["recall"])
    assert m.memorized_shares == [1.0] and m.memorized_share == 1.0
    assert m.num_training_images == 16 and m.memorization_quantile == 0.05
    assert m.memorization_threshold is not None and m.memorization_threshold > 0
    assert store.exists(layout.training_features(FINGERPRINT, standin.sha256, 16))
    skip = "FD-DINOv2 skipped: evaluate.dinov2_weights is not set"
    assert len(m.skipped) == 1 and m.skipped[0].startswith(skip) and m.fd_dinov2 is None
    assert caplog.text.count(skip) == 1 and skip in report
    assert "memorized share" in report and "precision" in report

    own = Store(StorageConfig(root=str(tmp_path)))
    ckpt_bytes = b"weights"
    ckpt = memorizing.checkpoint.model_copy(
        update={"key": "runs/nightly/checkpoints/step-00000600.pt", "sha256": _sha(ckpt_bytes)}
    )
    own.write_bytes(ckpt.key, ckpt_bytes)
    decision = promote_if_better(own, PromoteConfig(), m, ckpt)
    assert not decision.promoted and decision.reason.startswith("memorization: 100.0%")
    history = PromotionHistory.read(own, layout.model_history("default"))
    assert history.decisions[-1].reason == decision.reason
    assert not own.exists(layout.model_current("default"))
