"""FID / KID / IS maths against closed forms and against torch-fidelity as a reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)

from diffusion_core.fid import (
    feature_moments,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
)


def _correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


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


@pytest.mark.parametrize("n,d", [(500, 64), (400, 128)])
def test_frechet_distance_matches_torch_fidelity(n: int, d: int) -> None:
    rng = np.random.default_rng(3)
    f1, f2 = _correlated(rng, n, d), _correlated(rng, n, d, shift=0.2)
    mu1, s1 = feature_moments(f1)
    mu2, s2 = feature_moments(f2)
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


def test_kid_matches_torch_fidelity_same_subsets() -> None:
    rng = np.random.default_rng(5)
    f1, f2 = _correlated(rng, 120, 64), _correlated(rng, 90, 64, shift=0.1)
    reference = kid_features_to_metric(
        torch.from_numpy(f1),
        torch.from_numpy(f2),
        kid_subsets=20,
        kid_subset_size=50,
        rng_seed=7,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        verbose=False,
    )
    mean, std = kernel_inception_distance(f1, f2, subset_size=50, subsets=20, seed=7)
    assert mean == pytest.approx(reference[KEY_METRIC_KID_MEAN], rel=1e-9)
    assert std == pytest.approx(reference[KEY_METRIC_KID_STD], rel=1e-9)


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


def test_inception_score_matches_torch_fidelity() -> None:
    logits = np.random.default_rng(8).normal(scale=3.0, size=(200, 12))
    reference = isc_features_to_metric(
        torch.from_numpy(logits), splits=5, shuffle=True, rng_seed=2020
    )
    mean, std = inception_score(logits, splits=5, seed=2020)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-10)


def test_inception_score_bounds() -> None:
    # One confident class per image, balanced in each (unshuffled) split: IS = K; all alike: IS = 1.
    k = 4
    confident = np.full((400, k), -50.0)
    confident[np.arange(400), np.arange(400) % k] = 50.0
    assert inception_score(confident, splits=4, seed=None)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.zeros((40, k)), splits=4)[0] == pytest.approx(1.0)
