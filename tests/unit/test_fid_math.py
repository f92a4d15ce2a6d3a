"""FID / KID maths against closed forms and against torch-fidelity as a reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)

from diffusion_core.fid import (
    FeatureMoments,
    feature_moments,
    frechet_distance,
    kernel_inception_distance,
)


def _correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def _pool_like(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative, correlated, mean ~0.5: shaped like InceptionV3 pool features (post-ReLU)."""
    return np.maximum(_correlated(rng, n, d, shift=0.5 + shift), 0.0)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_frechet_distance_closed_form_diagonal() -> None:
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_closed_form_commuting_full_covariances() -> None:
    # Same eigenvectors: sqrt(s1 s2) = Q sqrt(a b) Q^T, so the distance is as in the diagonal case.
    rng = np.random.default_rng(1)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 2.0, size=d), rng.uniform(0.1, 2.0, size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu = rng.normal(size=d)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_identical_is_zero_and_symmetric() -> None:
    rng = np.random.default_rng(2)
    mu1, s1 = feature_moments(_correlated(rng, 300, 24))
    mu2, s2 = feature_moments(_correlated(rng, 300, 24, shift=0.3))
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        frechet_distance(mu2, s2, mu1, s1), rel=1e-9
    )


# N < D makes both covariances singular (rank N - 1): the case where the two algorithms could
# part. Measured relative differences: 2e-15 (600, 64), 1.3e-8 (400, 512), 3.6e-8 (300, 2048).
@pytest.mark.parametrize("n,d", [(600, 64), (400, 512), (300, 2048)])
def test_frechet_distance_matches_torch_fidelity(n: int, d: int) -> None:
    rng = np.random.default_rng(3)
    mu1, s1 = feature_moments(_pool_like(rng, n, d))
    mu2, s2 = feature_moments(_pool_like(rng, n, d, shift=0.05))
    reference = fid_statistics_to_metric(
        {"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False
    )
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(reference[KEY_METRIC_FID], rel=1e-6)


def test_feature_moments_match_numpy() -> None:
    f = np.random.default_rng(4).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = feature_moments(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)


def test_merged_moments_of_uneven_chunks_equal_the_single_pass() -> None:
    rng = np.random.default_rng(9)
    real = _pool_like(rng, 600, 256)
    fake = _pool_like(rng, 555, 256, shift=0.05).astype(np.float32)  # as stored by the tasks
    chunks = np.split(fake, [17, 400])  # 17, 383 and 155 rows, as from three uneven workers
    parts = [FeatureMoments.from_features(c) for c in chunks]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == len(fake)
    assert merged.total.dtype == np.float64 and merged.outer_total.shape == (256, 256)

    mu, sigma = merged.mean_cov()
    mu_ref, sigma_ref = feature_moments(fake)
    assert _relative(mu, mu_ref) < 1e-10
    assert _relative(sigma, sigma_ref) < 1e-10

    # `+` is `merge`, in any order
    mu_sum, sigma_sum = (parts[2] + parts[0] + parts[1]).mean_cov()
    assert _relative(mu_sum, mu_ref) < 1e-10 and _relative(sigma_sum, sigma_ref) < 1e-10

    fid_merged = frechet_distance(mu, sigma, *feature_moments(real))
    fid_single = frechet_distance(mu_ref, sigma_ref, *feature_moments(real))
    assert fid_merged == pytest.approx(fid_single, rel=1e-6)


def test_feature_moments_merge_with_an_empty_shard_and_validation() -> None:
    f = np.random.default_rng(10).normal(size=(20, 5))
    whole = FeatureMoments.from_features(f)
    with_empty = whole + FeatureMoments.from_features(np.zeros((0, 5)))
    np.testing.assert_array_equal(with_empty.mean_cov()[1], whole.mean_cov()[1])
    with pytest.raises(ValueError, match="cannot merge moments of 5-dim features with 4-dim"):
        whole.merge(FeatureMoments.from_features(np.zeros((3, 4))))
    with pytest.raises(ValueError, match="at least 2 features, these moments hold 1"):
        FeatureMoments.from_features(f[:1]).mean_cov()


def _kid_reference(f1: np.ndarray, f2: np.ndarray, size: int, subsets: int) -> dict[str, float]:
    # torch-fidelity computes in the features' dtype: give it float64, as ours uses
    return kid_features_to_metric(
        torch.from_numpy(np.asarray(f1, np.float64)),
        torch.from_numpy(np.asarray(f2, np.float64)),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=7,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        verbose=False,
    )


# Measured relative differences <= 5e-13 (float64 round-off in the kernel sums).
@pytest.mark.parametrize("n1,n2,d,size", [(120, 90, 64, 50), (500, 400, 2048, 300)])
def test_kid_matches_torch_fidelity_same_subsets(n1: int, n2: int, d: int, size: int) -> None:
    rng = np.random.default_rng(5)
    f1, f2 = _pool_like(rng, n1, d), _pool_like(rng, n2, d, shift=0.02)
    reference = _kid_reference(f1, f2, size, subsets=20)
    mean, std = kernel_inception_distance(f1, f2, subset_size=size, subsets=20, seed=7)
    assert mean == pytest.approx(reference[KEY_METRIC_KID_MEAN], rel=1e-6)
    assert std == pytest.approx(reference[KEY_METRIC_KID_STD], rel=1e-6)


def test_kid_of_float32_features_is_computed_in_float64() -> None:
    """The reason KID is not torch-fidelity's: stored features are float32, its kernels would be."""
    rng = np.random.default_rng(11)
    f1 = _pool_like(rng, 300, 512).astype(np.float32)
    f2 = _pool_like(rng, 300, 512, shift=0.02).astype(np.float32)
    got = kernel_inception_distance(f1, f2, subset_size=200, subsets=10, seed=7)
    assert got == kernel_inception_distance(
        f1.astype(np.float64), f2.astype(np.float64), subset_size=200, subsets=10, seed=7
    )
    reference = _kid_reference(f1, f2, 200, subsets=10)
    assert got[0] == pytest.approx(reference[KEY_METRIC_KID_MEAN], rel=1e-6)


def test_kid_symmetric_and_near_zero_for_same_distribution() -> None:
    rng = np.random.default_rng(6)
    f1, f2 = _correlated(rng, 100, 32), _correlated(rng, 100, 32)
    far = _correlated(rng, 100, 32, shift=1.0)
    # Full-set comparison (one subset of every row) is deterministic and exactly symmetric.
    ab = kernel_inception_distance(f1, f2, subset_size=100, subsets=1, seed=0)[0]
    ba = kernel_inception_distance(f2, f1, subset_size=100, subsets=1, seed=0)[0]
    assert ab == pytest.approx(ba, rel=1e-12)
    same = kernel_inception_distance(f1, f2, subset_size=50, subsets=50, seed=0)[0]
    different = kernel_inception_distance(f1, far, subset_size=50, subsets=50, seed=0)[0]
    assert abs(same) < 0.05 * different


def test_kid_rejects_subset_larger_than_inputs() -> None:
    f = np.zeros((10, 4))
    with pytest.raises(ValueError, match="kid_subset_size"):
        kernel_inception_distance(f, f, subset_size=11, subsets=1, seed=0)
