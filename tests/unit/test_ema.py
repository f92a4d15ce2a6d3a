"""EMA: warmup schedule, convergence, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_core.ema import EMA, ema_decay


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def test_warmup_formula() -> None:
    assert ema_decay(0, 0.999, 0) == 0.999
    assert ema_decay(0, 0.999, 100) == 0.0
    assert ema_decay(50, 0.999, 100) == pytest.approx(0.4995)
    assert ema_decay(100, 0.999, 100) == 0.999
    assert ema_decay(10_000, 0.999, 100) == 0.999


def test_update_matches_formula_and_copies_buffers() -> None:
    model = _model()
    ema = EMA(model, decay=0.9)
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    assert ema.update(model, step=0) == 0.9
    torch.testing.assert_close(ema.model[0].weight, 0.9 * before + 0.1 * model[0].weight)
    torch.testing.assert_close(ema.model[1].running_mean, torch.full((4,), 3.0))
    assert not ema.model.training
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_converges_to_constant_weights() -> None:
    model = _model()
    ema = EMA(model, decay=0.9, warmup_steps=5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    for step in range(200):
        ema.update(model, step)
    for p in ema.model.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 2.0))


def test_state_round_trip_resumes_exactly() -> None:
    model = _model()
    a = EMA(model, decay=0.95, warmup_steps=10)
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        a.update(model, step)
    b = EMA(_model(), decay=0.5)
    b.load_state_dict(a.state_dict())
    for step in range(3, 6):
        with torch.no_grad():
            model[0].weight.add_(0.1)
        a.update(model, step)
        b.update(model, step)
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert (b.decay, b.warmup_steps, b.num_updates) == (0.95, 10, 6)


def test_invalid_decay_names_value() -> None:
    with pytest.raises(ValueError, match="decay=1.5"):
        EMA(_model(), decay=1.5)
