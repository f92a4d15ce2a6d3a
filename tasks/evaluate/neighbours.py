"""The metrics beside FID that look at nearest neighbours in feature space, pure: no store, no Ray.

Both run on the same Inception pool features as FID (float32 [N, 2048]).

**Precision and recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models") are torch-fidelity's own (`prc_features_to_metric`, its `prc=True`):
each set's support is the union of balls around its points, of radius the distance to the point's
k-th nearest neighbour in its own set (k = 3). Precision is the share of samples inside the real
images' support (are the samples realistic?); recall the share of real images inside the
samples' support (do the samples cover the data?).

**Memorization.** With T a (bounded) set of training features and H the held-out features:

    d(x)  = min over t in T of ||x - t||             (Euclidean, float64)
    tau   = the q-quantile of {d(h) : h in H}         (q = evaluate.memorization_quantile)
    share = |{s in samples : d(s) < tau}| / |samples|

Held-out images are fresh draws from the data distribution that training never saw; a model that
generates such fresh images has samples as far from the training set as held-out images are, so
its share is about q (0.05 at the default). A model that copies training images puts them at
distance ~0 and its share rises towards 1 (dgm-eval's "AuthPct" asks the same question per sample).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)

PRC_NEIGHBORHOOD = 3  # torch-fidelity's default `prc_neighborhood` (and the paper's k)
_BATCH = 4096  # rows of a distance block: 4096 x 4096 float64 = 128 MiB at most


def precision_recall(
    samples: np.ndarray, reference: np.ndarray, neighborhood: int = PRC_NEIGHBORHOOD
) -> tuple[float, float] | None:
    """(precision, recall) of samples [N, D] against reference features [M, D], by torch-fidelity.

    None when a set has no more than `neighborhood` points (no k-th neighbour to set a radius)."""
    if min(len(samples), len(reference)) <= neighborhood:
        return None
    out = prc_features_to_metric(
        torch.from_numpy(np.ascontiguousarray(samples)),  # torch-fidelity: features_1 = generated
        torch.from_numpy(np.ascontiguousarray(reference)),  # features_2 = real
        prc_neighborhood=neighborhood,
        verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def nearest_distances(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """float64 [N]: the Euclidean distance of each row of `x` [N, D] to its nearest row of `train`
    [M, D], in blocks so memory stays bounded."""
    if len(train) == 0:
        raise ValueError("nearest_distances needs at least one training feature")
    t = torch.from_numpy(np.asarray(train, dtype=np.float64))
    out = []
    for lo in range(0, len(x), _BATCH):
        xb = torch.from_numpy(np.asarray(x[lo : lo + _BATCH], dtype=np.float64))
        best = torch.cat(
            [torch.cdist(xb, tb).min(dim=1).values[:, None] for tb in t.split(_BATCH)], 1
        )
        out.append(best.min(dim=1).values.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def memorization_threshold(holdout: np.ndarray, train: np.ndarray, quantile: float) -> float:
    """tau: the `quantile` of the held-out features' nearest-training distances."""
    return float(np.quantile(nearest_distances(holdout, train), quantile))


def memorized_share(samples: np.ndarray, train: np.ndarray, threshold: float) -> float:
    """The share of samples whose nearest training feature is closer than `threshold` (tau)."""
    return float(np.mean(nearest_distances(samples, train) < threshold))
