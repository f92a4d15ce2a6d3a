"""eps/x0/v conversions, the training loss and min-SNR weights."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diffusion_core.objectives import (
    eps_from_v,
    eps_from_x0,
    min_snr_weight,
    to_eps_x0,
    training_loss,
    v_from_eps_x0,
    x0_from_eps,
    x0_from_v,
)
from diffusion_core.schedules import alpha_bar_from_betas, linear_betas

ALPHA_BAR = alpha_bar_from_betas(linear_betas())


def batch() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    alpha_bar_t = ALPHA_BAR[torch.tensor([0, 10, 500, 999])]
    x_t = (
        alpha_bar_t.sqrt().view(-1, 1, 1, 1) * x0 + (1 - alpha_bar_t).sqrt().view(-1, 1, 1, 1) * eps
    )
    return x0, eps, x_t, alpha_bar_t


def test_round_trips() -> None:
    x0, eps, x_t, ab = batch()
    torch.testing.assert_close(eps_from_x0(x0, x_t, ab), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_from_eps(eps, x_t, ab), x0, rtol=1e-7, atol=1e-7)
    v = v_from_eps_x0(eps, x0, ab)
    torch.testing.assert_close(eps_from_v(v, x_t, ab), eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0_from_v(v, x_t, ab), x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_to_eps_x0_for_every_prediction_type(prediction_type: str) -> None:
    x0, eps, x_t, ab = batch()
    pred = {"epsilon": eps, "v": v_from_eps_x0(eps, x0, ab), "x0": x0}[prediction_type]
    eps_hat, x0_hat = to_eps_x0(pred, x_t, ab, prediction_type)  # type: ignore[arg-type]
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7)


def test_conversions_keep_dtype_and_accept_float32() -> None:
    x0, eps, x_t, ab = batch()
    out = x0_from_eps(eps.float(), x_t.float(), ab)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[1:], x0[1:].float(), rtol=1e-3, atol=1e-3)


def test_to_eps_x0_rejects_unknown_type() -> None:
    x0, eps, x_t, ab = batch()
    with pytest.raises(ValueError, match="'score' unknown; choose one of: epsilon, v, x0"):
        to_eps_x0(eps, x_t, ab, "score")  # type: ignore[arg-type]


def test_min_snr_weights_match_hang_et_al() -> None:
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    gamma = 5.0
    torch.testing.assert_close(
        min_snr_weight(snr, gamma, "epsilon"),
        torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64),
    )
    torch.testing.assert_close(
        min_snr_weight(snr, gamma, "v"),
        torch.tensor([0.0, 0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0], dtype=torch.float64),
    )
    torch.testing.assert_close(
        min_snr_weight(snr, gamma, "x0"), torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=torch.float64)
    )


class Recorder:
    """A 'network' that returns a fixed prediction and records its inputs."""

    def __init__(self, pred: Tensor | None = None) -> None:
        self.pred = pred
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def __call__(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        self.calls.append((x_t, t, labels))
        return torch.zeros_like(x_t) if self.pred is None else self.pred


def draws(seed: int, x0: Tensor) -> tuple[Tensor, Tensor]:
    """The (t, eps) that training_loss draws from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    return t, torch.randn(x0.shape, generator=g, dtype=x0.dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_training_loss_is_mse_to_the_right_target(prediction_type: str) -> None:
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    net = Recorder()
    loss = training_loss(
        net,
        x0,
        None,
        alpha_bar=ALPHA_BAR,
        prediction_type=prediction_type,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(7),
    )
    t, eps = draws(7, x0)
    x_t, t_seen, labels = net.calls[0]
    assert torch.equal(t_seen, t) and labels is None
    ab = ALPHA_BAR[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).float())
    target = {"epsilon": eps, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "x0": x0}[
        prediction_type
    ]
    # the network predicted zeros, so the loss is the target's mean square
    torch.testing.assert_close(loss, target.float().square().mean(), rtol=1e-5, atol=0)


def test_training_loss_min_snr_weighting() -> None:
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    loss = training_loss(
        Recorder(),
        x0,
        None,
        alpha_bar=ALPHA_BAR,
        prediction_type="epsilon",
        generator=torch.Generator().manual_seed(7),
        min_snr_gamma=5.0,
    )
    t, eps = draws(7, x0)
    snr = ALPHA_BAR[t] / (1 - ALPHA_BAR[t])
    weight = torch.clamp(snr, max=5.0) / snr
    expected = (weight.float() * eps.square().flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_label_dropout_uses_null_label() -> None:
    x0 = torch.zeros(2000, 1, 1, 1)
    labels = torch.full((2000,), 3)
    net = Recorder()
    training_loss(
        net,
        x0,
        labels,
        alpha_bar=ALPHA_BAR,
        generator=torch.Generator().manual_seed(0),
        label_dropout=0.25,
        null_label=10,
    )
    seen = net.calls[0][2]
    assert seen is not None and set(seen.unique().tolist()) == {3, 10}
    assert (seen == 10).float().mean().item() == pytest.approx(0.25, abs=0.03)
    training_loss(net, x0, labels, alpha_bar=ALPHA_BAR)
    assert torch.equal(net.calls[1][2], labels)


def test_training_loss_validates_options() -> None:
    x0 = torch.zeros(2, 1, 1, 1)
    with pytest.raises(ValueError, match="label_dropout=0.1 needs class_labels and null_label"):
        training_loss(
            Recorder(), x0, torch.zeros(2, dtype=torch.long), alpha_bar=ALPHA_BAR, label_dropout=0.1
        )
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\], got 1.5"):
        training_loss(Recorder(), x0, None, alpha_bar=ALPHA_BAR, label_dropout=1.5)
    with pytest.raises(ValueError, match="'eps' unknown"):
        training_loss(Recorder(), x0, None, alpha_bar=ALPHA_BAR, prediction_type="eps")  # type: ignore[arg-type]


def test_training_loss_backpropagates() -> None:
    w = torch.zeros(1, requires_grad=True)
    x0 = torch.randn(4, 1, 2, 2)
    loss = training_loss(lambda x, t, c: w * x, x0, None, alpha_bar=ALPHA_BAR)
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
