"""Sample-quality metrics on extracted features: Frechet distance, exact mergeable feature moments
and KID.

Pure maths on arrays: feature extraction (InceptionV3) and I/O live in `tasks/`. Features are
[N, D] rows, statistics are float64. On float64 features the results equal torch-fidelity's (the
published reference implementations; `tests/unit/test_fid_math.py` holds them to 1e-6); each
function says in one line why it is not torch-fidelity's own. The Inception Score has no such
reason: use torch-fidelity's `metric_isc.isc_features_to_metric`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def feature_moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mu float64 [D], sigma float64 [D, D]); sigma unbiased (ddof=1)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"feature_moments needs [N, D] features with N >= 2, got shape {features.shape}"
        )
    x = np.asarray(features, dtype=np.float64)
    mu = x.mean(axis=0)
    sigma = np.cov(x, rowvar=False)
    return mu, sigma


@dataclass(frozen=True, eq=False)
class FeatureMoments:
    """Raw moments of a set of [N, D] features, float64: the row count, the sum of the rows [D]
    and the sum of their outer products [D, D].

    Moments of disjoint shards add up to the moments of their union, so the FID statistics of a
    sample set split over workers or GPUs need no gathering of features: EDM's
    `calculate_inception_stats` all-reduces exactly these two sums (Karras et al. 2022, fid.py).
    ``mean_cov`` subtracts n mu mu^T from the outer-product sum, which costs the covariance about
    log10(1 + mu^2 / variance) of float64's 16 digits: negligible unless |mu| >> std.
    """

    count: int
    total: np.ndarray  # float64 [D], sum of the rows
    outer_total: np.ndarray  # float64 [D, D], sum of x x^T over the rows

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureMoments:
        """Moments of [N, D] features (N >= 0; a shard may be empty)."""
        if features.ndim != 2:
            raise ValueError(f"FeatureMoments needs [N, D] features, got shape {features.shape}")
        x = np.asarray(features, dtype=np.float64)
        return cls(count=x.shape[0], total=x.sum(axis=0), outer_total=x.T @ x)

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """The moments of the union of both feature sets."""
        if self.total.shape != other.total.shape:
            raise ValueError(
                f"cannot merge moments of {self.total.shape[0]}-dim features with "
                f"{other.total.shape[0]}-dim ones; both must come from the same feature layer"
            )
        return FeatureMoments(
            count=self.count + other.count,
            total=self.total + other.total,
            outer_total=self.outer_total + other.outer_total,
        )

    __add__ = merge

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu float64 [D], sigma float64 [D, D]), sigma unbiased (ddof=1) as `feature_moments`."""
        n = self.count
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 features, these moments hold {n}")
        mu = self.total / n
        sigma = (self.outer_total - n * np.outer(mu, mu)) / (n - 1)
        return mu, sigma


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6).

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    tr((s1 s2)^(1/2)) is the sum of the square roots of the eigenvalues of s1^(1/2) s2 s1^(1/2),
    which is similar to s1 s2. Computed in float64.

    Not torch-fidelity's: eigh of a symmetric matrix is real by construction, eigvals(s1 s2) is not.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(
            f"means must be [D] vectors of the same size, got {mu1.shape} and {mu2.shape}"
        )
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")

    # 1. symmetrise against round-off in the inputs, then s1^(1/2)
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    sqrt_s1 = _sqrtm_psd(sigma1)
    # 2. eigenvalues of s1^(1/2) s2 s1^(1/2): real, >= 0 up to round-off, which is clipped
    m = sqrt_s1 @ sigma2 @ sqrt_s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    # 3. Heusel et al. eq. 6
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0
) -> np.ndarray:
    """k(x, y) = (x.y / D + coef0)^degree, the KID kernel (Binkowski et al. 2018, sec. 4)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 estimate from m x m kernel matrices (Gretton et al. 2012, eq. 3)."""
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    f1: np.ndarray, f2: np.ndarray, subset_size: int, subsets: int, seed: int
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel, mean over subsets.

    f1 [N1, D], f2 [N2, D]. Each of `subsets` rounds draws `subset_size` rows of f1, then of f2,
    without replacement from `np.random.RandomState(seed)`: the same draws as torch-fidelity's
    `kid_features_to_metric` with `rng_seed=seed`. Returns (mean, std) over the subsets.

    Not torch-fidelity's: its kernels run in the input dtype, ~1e-4 off on float32 features.
    """
    n1, n2 = len(f1), len(f2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(
            f"KID needs [N, D] features of one D, got shapes {f1.shape} and {f2.shape}"
        )
    if subset_size < 2 or subset_size > min(n1, n2):
        raise ValueError(
            f"KID subset_size={subset_size} must be in [2, min(N1, N2)={min(n1, n2)}]; "
            "lower evaluate.kid_subset_size or evaluate more images"
        )
    x_all, y_all = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = x_all[rng.choice(n1, subset_size, replace=False)]
        y = y_all[rng.choice(n2, subset_size, replace=False)]
        k_xx, k_yy, k_xy = (
            _polynomial_kernel(x, x),
            _polynomial_kernel(y, y),
            _polynomial_kernel(x, y),
        )
        mmds[i] = _mmd2_unbiased(k_xx, k_xy, k_yy)
    return float(mmds.mean()), float(mmds.std())
