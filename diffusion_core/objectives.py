"""What the network predicts and how it is trained: eps/x0/v conversions, the DDPM loss, min-SNR.

Forward process (DDPM eq. 4): x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
v-prediction (Salimans & Ho 2022, sec. 4): v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0.
``alpha_bar_t`` is per image, shape [B] (or a scalar), broadcast over [B, C, H, W]; its square roots
are taken in its own dtype (float64 from the schedule) and only then cast to the data's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v", "x0"]

# net(x_t [B, C, H, W], t int64 [B], class_labels int64 [B] or None) -> prediction [B, C, H, W]
Network = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _coefficients(alpha_bar_t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) shaped [B, 1, ..., 1] in ``like``'s dtype."""
    shape = alpha_bar_t.shape + (1,) * (like.dim() - alpha_bar_t.dim())
    alpha_bar_t = alpha_bar_t.reshape(shape).to(like.device)
    return alpha_bar_t.sqrt().to(like.dtype), (1 - alpha_bar_t).sqrt().to(like.dtype)


def eps_from_x0(x0: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab), inverting DDPM eq. 4."""
    a, s = _coefficients(alpha_bar_t, x_t)
    return (x_t - a * x0) / s


def x0_from_eps(eps: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) (DDPM eq. 15, DDIM eq. 12's "predicted x0")."""
    a, s = _coefficients(alpha_bar_t, x_t)
    return (x_t - s * eps) / a


def v_from_eps_x0(eps: Tensor, x0: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, sec. 4)."""
    a, s = _coefficients(alpha_bar_t, eps)
    return a * eps - s * x0


def eps_from_v(v: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """eps = sqrt(ab) v + sqrt(1 - ab) x_t."""
    a, s = _coefficients(alpha_bar_t, x_t)
    return a * v + s * x_t


def x0_from_v(v: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """x0 = sqrt(ab) x_t - sqrt(1 - ab) v."""
    a, s = _coefficients(alpha_bar_t, x_t)
    return a * x_t - s * v


def to_eps_x0(
    pred: Tensor, x_t: Tensor, alpha_bar_t: Tensor, prediction_type: PredictionType
) -> tuple[Tensor, Tensor]:
    """A network's prediction of either type as (eps_hat, x0_hat), both shaped like ``x_t``."""
    if prediction_type == "epsilon":
        return pred, x0_from_eps(pred, x_t, alpha_bar_t)
    if prediction_type == "v":
        return eps_from_v(pred, x_t, alpha_bar_t), x0_from_v(pred, x_t, alpha_bar_t)
    if prediction_type == "x0":
        return eps_from_x0(pred, x_t, alpha_bar_t), pred
    raise ValueError(
        f"prediction_type {prediction_type!r} unknown; choose one of: "
        f"{', '.join(get_args(PredictionType))}"
    )


def min_snr_weight(snr_t: Tensor, gamma: float, prediction_type: PredictionType) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy") for an MSE on the given target, so that every target type weighs the
    x0 error by min(SNR, gamma). Same shape as ``snr_t``.

    eps target: min(snr, g) / snr; v target: min(snr, g) / (snr + 1); x0 target: min(snr, g).
    """
    if prediction_type == "epsilon":
        # min(snr, g) / snr, written so that snr = 0 (cosine schedule's end) gives 1, not nan
        return (gamma / snr_t).clamp(max=1.0)
    if prediction_type == "v":
        return snr_t.clamp(max=gamma) / (snr_t + 1)
    if prediction_type == "x0":
        return snr_t.clamp(max=gamma)
    raise ValueError(
        f"prediction_type {prediction_type!r} unknown; choose one of: "
        f"{', '.join(get_args(PredictionType))}"
    )


def training_loss(
    net: Network,
    x0: Tensor,
    class_labels: Tensor | None,
    *,
    alpha_bar: Tensor,
    prediction_type: PredictionType = "epsilon",
    generator: torch.Generator | None = None,
    min_snr_gamma: float | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
) -> Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14 / algorithm 1) for any prediction type. Scalar.

    x0: data [B, C, H, W]; class_labels: int64 [B] or None; alpha_bar: the schedule, float64 [T].
    t ~ U{0..T-1} and eps ~ N(0, I) are drawn with ``generator`` (on x0's device; None = global
    RNG), in that order, then the label-dropout coin. The per-image MSE is weighted by
    min-SNR-gamma when ``min_snr_gamma`` is set; labels are replaced by ``null_label`` with
    probability ``label_dropout`` to train the unconditional model of classifier-free guidance
    (Ho & Salimans 2022, algorithm 1).
    """
    if prediction_type not in get_args(PredictionType):
        raise ValueError(
            f"prediction_type {prediction_type!r} unknown; choose one of: "
            f"{', '.join(get_args(PredictionType))}"
        )
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
    if label_dropout > 0 and (class_labels is None or null_label is None):
        raise ValueError(
            f"label_dropout={label_dropout} needs class_labels and null_label (got "
            f"class_labels={'None' if class_labels is None else 'a tensor'}, "
            f"null_label={null_label}); set label_dropout=0 for an unconditional model"
        )
    batch, device = x0.shape[0], x0.device

    # 1. timestep and noise; alpha_bar gathered in float64, cast only in the coefficients
    t = torch.randint(0, alpha_bar.shape[0], (batch,), generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    alpha_bar_t = alpha_bar.to(device=device, dtype=torch.float64)[t]
    a, s = _coefficients(alpha_bar_t, x0)

    # 2. forward process, DDPM eq. 4
    x_t = a * x0 + s * eps

    # 3. classifier-free guidance's label dropout
    if label_dropout > 0:
        assert class_labels is not None and null_label is not None
        drop = torch.rand(batch, generator=generator, device=device) < label_dropout
        class_labels = torch.where(drop, torch.full_like(class_labels, null_label), class_labels)

    # 4. regression target for the chosen parametrisation
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "v":
        target = a * eps - s * x0
    else:
        target = x0

    pred = net(x_t, t, class_labels)
    per_image = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)

    # 5. min-SNR-gamma weighting, Hang et al. 2023
    if min_snr_gamma is not None:
        snr_t = alpha_bar_t / (1 - alpha_bar_t)
        per_image = per_image * min_snr_weight(snr_t, min_snr_gamma, prediction_type).float()
    return per_image.mean()
