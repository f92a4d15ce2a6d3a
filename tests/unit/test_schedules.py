"""Schedules against the papers' numbers and diffusers' values; timestep spacings."""

from __future__ import annotations

import math
from typing import get_args

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from diffusion_core.schedules import (
    LAMBDA_MIN,
    ScheduleKind,
    Spacing,
    alpha_bar_from_betas,
    cosine_betas,
    linear_betas,
    make_betas,
    make_timesteps,
    scaled_linear_betas,
)


def test_linear_betas_are_ddpm_paper_values() -> None:
    betas = linear_betas()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(
        betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64)
    )


def test_linear_alpha_bar_known_values() -> None:
    alpha_bar = alpha_bar_from_betas(linear_betas())
    # alpha_bar_t = prod (1 - beta_s), computed here independently in log space
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for t in (0, 1, 499, 999):
        expected = math.exp(sum(math.log1p(-b) for b in betas[: t + 1]))
        assert alpha_bar[t].item() == pytest.approx(expected, rel=1e-12)
    assert alpha_bar[0].item() == pytest.approx(0.9999, rel=1e-12)
    # DDPM's schedule ends with alpha_bar_T ~ 4.04e-5 (SNR ~ -44 dB), nearly pure noise
    assert alpha_bar[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_betas_follow_improved_ddpm_eq_17() -> None:
    T, s = 1000, 0.008

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_betas(T, s=s)
    alpha_bar = alpha_bar_from_betas(betas)
    for t in (0, 100, 500, 900, 990):
        # index t is the paper's step t + 1
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    # f(T) = 0 would make beta_T = 1; it is clipped to max_beta
    assert betas[-1].item() == 0.999
    assert betas.max().item() == 0.999
    assert bool((betas > 0).all())


def test_cosine_clipping_threshold_is_honoured() -> None:
    assert cosine_betas(1000, max_beta=0.5).max().item() == 0.5


@pytest.mark.parametrize(
    "kind, diffusers_name",
    [("linear", "linear"), ("cosine", "squaredcos_cap_v2"), ("scaled_linear", "scaled_linear")],
)
def test_schedules_match_diffusers(kind: str, diffusers_name: str) -> None:
    defaults = {"linear": (1e-4, 0.02), "cosine": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
    start, end = defaults[kind]
    theirs = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=diffusers_name, beta_start=start, beta_end=end
    )
    ours = make_betas(kind, 1000)
    # diffusers keeps betas in float32
    assert torch.allclose(ours.float(), theirs.betas, rtol=1e-6, atol=0)
    assert torch.allclose(
        alpha_bar_from_betas(ours), theirs.alphas_cumprod.double(), rtol=2e-5, atol=1e-12
    )


def test_scaled_linear_is_linear_in_sqrt_beta() -> None:
    root = scaled_linear_betas().sqrt()
    assert torch.allclose(root.diff(), root.diff()[0].expand(999), rtol=1e-9)


def test_make_betas_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"'sigmoid' unknown; choose one of: linear, cosine"):
        make_betas("sigmoid", 1000)  # type: ignore[arg-type]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 16, 50, 250, 999, 1000])
def test_timesteps_match_diffusers_spacing(spacing: str, num_steps: int) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    scheduler.set_timesteps(num_steps)
    ours = make_timesteps(1000, num_steps, spacing)  # type: ignore[arg-type]
    assert ours.dtype == torch.int64 and ours.shape == (num_steps,)
    assert bool((ours[1:] < ours[:-1]).all())
    assert int(ours.min()) >= 0 and int(ours.max()) <= 999
    # diffusers' "trailing" arange can overshoot by one value (e.g. n=3 ends with -1); ours keeps n
    assert torch.equal(ours, scheduler.timesteps[:num_steps])


def test_known_spacings() -> None:
    assert make_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert make_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]


@pytest.mark.parametrize("num_steps", [0, 1001])
def test_make_timesteps_validates_num_steps(num_steps: int) -> None:
    with pytest.raises(ValueError, match=rf"num_steps must be in \[1, 1000\].*got {num_steps}"):
        make_timesteps(1000, num_steps)


def test_make_timesteps_rejects_unknown_spacing() -> None:
    with pytest.raises(ValueError, match="'uniform' unknown; choose one of: leading, trailing"):
        make_timesteps(1000, 10, "uniform")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", get_args(ScheduleKind))
@pytest.mark.parametrize("spacing", get_args(Spacing))
def test_timesteps_contract_of_every_spacing(kind: ScheduleKind, spacing: Spacing) -> None:
    """What the samplers rely on: int64 [n], strictly descending, within [0, T - 1]."""
    alpha_bar = alpha_bar_from_betas(make_betas(kind, 1000))
    for num_steps in (1, 2, 3, 7, 10, 16, 20, 50, 250, 999, 1000):
        ours = make_timesteps(1000, num_steps, spacing, alpha_bar=alpha_bar)
        assert ours.dtype == torch.int64 and ours.shape == (num_steps,), (num_steps, ours)
        assert bool((ours[1:] < ours[:-1]).all()), (num_steps, ours)
        assert int(ours.min()) >= 0 and int(ours.max()) <= 999, (num_steps, ours)
        if spacing in ("logsnr", "karras") and num_steps > 1:
            assert int(ours[-1]) == 0, (num_steps, ours)


def _half_log_snr(alpha_bar: torch.Tensor) -> np.ndarray:
    return (0.5 * torch.log(alpha_bar / (1 - alpha_bar))).numpy()


@pytest.mark.parametrize(
    "kind, betas",
    [("linear", {}), ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012})],
)
@pytest.mark.parametrize(
    "spacing, option", [("logsnr", "use_lu_lambdas"), ("karras", "use_karras_sigmas")]
)
@pytest.mark.parametrize("num_steps", [2, 5, 10, 20, 25])
def test_noise_level_spacings_match_diffusers(
    kind: ScheduleKind, betas: dict[str, float], spacing: Spacing, option: str, num_steps: int
) -> None:
    # diffusers maps the same lambdas (Lu et al.) or sigmas (Karras et al.) to timesteps by
    # interpolating in log sigma and rounding; at these step counts its timesteps are distinct.
    # (At more steps near t = 0 they repeat, and ours move to the next free timestep instead.)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule=kind, **betas, **{option: True}
    )
    scheduler.set_timesteps(num_steps)
    alpha_bar = alpha_bar_from_betas(make_betas(kind, 1000))
    ours = make_timesteps(1000, num_steps, spacing, alpha_bar=alpha_bar)
    assert torch.equal(ours, scheduler.timesteps)


def test_logsnr_spacing_is_uniform_in_lambda() -> None:
    alpha_bar = alpha_bar_from_betas(make_betas("linear", 1000))
    lam = _half_log_snr(alpha_bar)
    ours = make_timesteps(1000, 10, "logsnr", alpha_bar=alpha_bar)
    assert ours.tolist() == [999, 886, 757, 603, 410, 202, 73, 22, 5, 0]
    targets = np.linspace(lam[-1], lam[0], 10)
    # each step is the trained timestep nearest its target: within half a grid cell in lambda
    for t, target in zip(ours.tolist(), targets, strict=True):
        neighbours = [lam[u] for u in (t - 1, t + 1) if 0 <= u < 1000]
        assert all(abs(lam[t] - target) <= abs(v - target) for v in neighbours)


def test_karras_spacing_follows_edm_eq_5() -> None:
    alpha_bar = alpha_bar_from_betas(make_betas("linear", 1000))
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().numpy()
    ours = make_timesteps(1000, 8, "karras", alpha_bar=alpha_bar).numpy()
    rho, n = 7.0, 8
    expected = (
        sigma[-1] ** (1 / rho)
        + np.arange(n) / (n - 1) * (sigma[0] ** (1 / rho) - sigma[-1] ** (1 / rho))
    ) ** rho
    # the chosen timesteps' sigmas are the nearest ones to EDM's, in log sigma
    log_sigma = np.log(sigma)
    for t, target in zip(ours.tolist(), np.log(expected), strict=True):
        assert int(np.abs(log_sigma - target).argmin()) == t


def test_cosine_noise_level_spacings_start_at_lambda_min() -> None:
    """Cosine's clipped tail (lambda from -5.4 to -9.9 over t = 996..999) is skipped: the first
    step is the timestep nearest LAMBDA_MIN; schedules that end above it start at T - 1."""
    cosine = alpha_bar_from_betas(make_betas("cosine", 1000))
    lam = _half_log_snr(cosine)
    assert lam[-1] < -9.5 and lam[996] < LAMBDA_MIN < lam[995]
    spacings: tuple[Spacing, ...] = ("logsnr", "karras")
    kinds: tuple[ScheduleKind, ...] = ("linear", "scaled_linear")
    for spacing in spacings:
        assert int(make_timesteps(1000, 20, spacing, alpha_bar=cosine)[0]) == 995
        for kind in kinds:
            alpha_bar = alpha_bar_from_betas(make_betas(kind, 1000))
            assert int(make_timesteps(1000, 20, spacing, alpha_bar=alpha_bar)[0]) == 999


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_noise_level_spacings_need_the_schedule(spacing: Spacing) -> None:
    with pytest.raises(ValueError, match=rf"spacing '{spacing}' follows the schedule's noise"):
        make_timesteps(1000, 10, spacing)
    with pytest.raises(ValueError, match=r"of shape \(1000,\), got shape \(500,\)"):
        make_timesteps(1000, 10, spacing, alpha_bar=alpha_bar_from_betas(linear_betas(500)))
