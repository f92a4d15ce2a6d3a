"""Noise schedules of discrete-time VP diffusion: betas, alpha_bar and sampling timesteps.

Pure functions returning float64 tensors (timesteps: int64). Index ``t`` in ``[0, T)`` is the
paper's step ``t + 1``: ``alpha_bar[t] = prod_{s <= t} (1 - betas[s])``, as in diffusers.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

ScheduleKind = Literal["linear", "cosine", "scaled_linear"]
Spacing = Literal["leading", "trailing", "linspace", "logsnr", "karras"]

# The noisiest half-log-SNR, lambda = log(alpha / sigma), that "logsnr" and "karras" start from:
# below it x_t is noise to within alpha < 0.0061. DDPM's linear schedule ends at -5.06 and EDM's
# VP at -5.02 (sigma_max = 152, Karras et al. 2022, table 1), but the cosine schedule's clipped
# tail (max_beta) falls to -9.9 in its last four timesteps, where equal steps would be spent on
# nothing (DPM-Solver's code likewise ends its continuous cosine schedule early: T = 0.9946,
# lambda = -4.8).
LAMBDA_MIN = -5.1


def linear_betas(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """DDPM's schedule (Ho et al. 2020, sec. 4): betas linear from beta_1 to beta_T. [T] float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17). [T] float64.

    alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), and
    beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1) clipped at ``max_beta`` so the last steps do not
    reach beta = 1 (the paper clips at 0.999).
    """
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def scaled_linear_betas(
    num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Latent/Stable Diffusion's schedule: sqrt(beta) linear (diffusers' "scaled_linear"). [T]."""
    sqrt_betas = torch.linspace(
        math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=torch.float64
    )
    return sqrt_betas**2


def make_betas(kind: ScheduleKind, num_timesteps: int) -> Tensor:
    """The named schedule's betas with its papers' default constants. [T] float64."""
    if kind == "linear":
        return linear_betas(num_timesteps)
    if kind == "cosine":
        return cosine_betas(num_timesteps)
    if kind == "scaled_linear":
        return scaled_linear_betas(num_timesteps)
    choices = ", ".join(get_args(ScheduleKind))
    raise ValueError(f"schedule {kind!r} unknown; choose one of: {choices}")


def alpha_bar_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) (DDPM eq. 4), in float64. [T]."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def _half_log_snr(alpha_bar: Tensor) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = log(alpha_bar / (1 - alpha_bar)) / 2, float64 [T]."""
    ab = alpha_bar.detach().cpu().to(torch.float64)
    return (0.5 * (ab.log() - (-ab).log1p())).numpy()


def _nearest_timesteps(lam: np.ndarray, targets: np.ndarray) -> Tensor:
    """The trained timesteps whose lambda is nearest each target (targets ascending in lambda),
    as strictly descending int64 [n].

    Rounding the timestep interpolated in lambda picks the nearest one (as diffusers'
    ``_sigma_to_t`` then ``round``). The grid is coarse in lambda at both ends (near t = 0, and in
    cosine's clipped tail), where targets can share a timestep: each one then moves to the next
    free timestep, so that n distinct timesteps always come back (for n = T, all of them).
    """
    num_timesteps, n = len(lam), len(targets)
    # 1. nearest timestep; lambda decreases with t, so interpolate in -lambda = log sigma
    steps = np.rint(np.interp(-targets, -lam, np.arange(num_timesteps))).astype(np.int64)
    # 2. leave room above for the i noisier steps, then push shared timesteps apart upwards
    steps = np.minimum(steps, num_timesteps - 1 - np.arange(n))
    for i in range(n - 2, -1, -1):
        steps[i] = max(steps[i], steps[i + 1] + 1)
    return torch.from_numpy(steps)


def logsnr_timesteps(
    alpha_bar: Tensor, num_steps: int, *, lambda_min: float = LAMBDA_MIN
) -> Tensor:
    """Timesteps uniform in half-log-SNR lambda = log(alpha / sigma), the time steps of
    DPM-Solver (Lu et al. 2022, sec. 3.3, "logSNR" in its code), mapped to the nearest trained
    timesteps of ``alpha_bar`` [T]. Descending int64 [num_steps].

    DPM-Solver integrates in lambda and its local error grows with the step h in lambda, so
    equal h is its natural grid. lambda runs from max(lambda_{T-1}, ``lambda_min``) to lambda_0;
    the samplers' last step then goes to sigma = 0.
    """
    lam = _half_log_snr(alpha_bar)
    lambda_start = max(float(lam[-1]), lambda_min)
    if lambda_start >= lam[0]:
        raise ValueError(f"lambda_min={lambda_min} must be below lambda_0 = {lam[0]:.3f}")
    # 1. equal steps in lambda, DPM-Solver sec. 3.3
    targets = np.linspace(lambda_start, lam[0], num_steps)
    # 2. the nearest trained timesteps
    return _nearest_timesteps(lam, targets)


def karras_timesteps(
    alpha_bar: Tensor, num_steps: int, *, rho: float = 7.0, lambda_min: float = LAMBDA_MIN
) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, eq. 5, rho = 7), mapped to the nearest trained
    timesteps of ``alpha_bar`` [T]. Descending int64 [num_steps].

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    with the VP sigma = sqrt((1 - alpha_bar) / alpha_bar) (EDM table 1), sigma_min = sigma_0 and
    sigma_max = sigma_{T-1}, capped at exp(-``lambda_min``); the samplers' last step then goes to
    sigma = 0 (EDM's sigma_N = 0). rho = 7 makes the steps shorter at low noise.
    """
    lam = _half_log_snr(alpha_bar)
    sigma_max = math.exp(-max(float(lam[-1]), lambda_min))
    sigma_min = math.exp(-float(lam[0]))
    if sigma_max <= sigma_min:
        raise ValueError(f"lambda_min={lambda_min} must be below lambda_0 = {lam[0]:.3f}")
    # 1. EDM eq. 5
    ramp = np.linspace(0.0, 1.0, num_steps)
    root_max, root_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (root_max + ramp * (root_min - root_max)) ** rho
    # 2. the nearest trained timesteps, by lambda = -log(sigma)
    return _nearest_timesteps(lam, -np.log(sigmas))


def make_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: Spacing = "leading",
    *,
    alpha_bar: Tensor | None = None,
) -> Tensor:
    """Descending sampling timesteps, int64 [num_steps] in [0, T-1].

    The spacings of Lin et al. 2024 ("Common diffusion noise schedules and sample steps are
    flawed", table 2), exactly as diffusers' ``timestep_spacing`` with ``steps_offset=0``:
    - "leading":  ``arange(n) * (T // n)`` reversed; the last step is t = 0 but the first is below
      T - 1 when n does not divide T.
    - "trailing": ``round(T - i * T / n) - 1``; starts at T - 1 (recommended by Lin et al.).
    - "linspace": ``round(linspace(0, T - 1, n))`` reversed; covers both ends.
    numpy does the float arithmetic so rounding ties fall exactly as in diffusers; unlike
    diffusers' ``arange(T, 0, -T / n)``, "trailing" always returns exactly ``num_steps`` values.
    Two spacings follow the schedule's noise levels, so they need its ``alpha_bar`` [T]:
    - "logsnr": uniform in log-SNR, DPM-Solver's steps (`logsnr_timesteps`).
    - "karras": EDM's sigmas with rho = 7 (`karras_timesteps`).
    Both end at t = 0 and start at T - 1, or where lambda = ``LAMBDA_MIN`` when the schedule's
    end is noisier (the cosine schedule: t = 995 of 1000).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be in [1, {num_timesteps}] (the training timesteps), got {num_steps}"
        )
    if spacing in ("logsnr", "karras"):
        if alpha_bar is None or tuple(alpha_bar.shape) != (num_timesteps,):
            got = "None" if alpha_bar is None else f"shape {tuple(alpha_bar.shape)}"
            raise ValueError(
                f"spacing {spacing!r} follows the schedule's noise levels: pass "
                f"alpha_bar=alpha_bar_from_betas(betas) of shape ({num_timesteps},), got {got}"
            )
        if spacing == "logsnr":
            return logsnr_timesteps(alpha_bar, num_steps)
        return karras_timesteps(alpha_bar, num_steps)
    if spacing == "leading":
        steps: np.ndarray = np.arange(num_steps)[::-1] * (num_timesteps // num_steps)
    elif spacing == "trailing":
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))[:num_steps] - 1
    elif spacing == "linspace":
        steps = np.linspace(0, num_timesteps - 1, num_steps).round()[::-1]
    else:
        choices = ", ".join(get_args(Spacing))
        raise ValueError(f"spacing {spacing!r} unknown; choose one of: {choices}")
    timesteps = torch.from_numpy(steps.astype(np.int64).copy())
    assert bool((timesteps[1:] < timesteps[:-1]).all()), timesteps
    return timesteps
