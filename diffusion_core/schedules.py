"""Noise schedules of discrete-time VP diffusion: betas, alpha_bar, SNR and sampling timesteps.

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
Spacing = Literal["leading", "trailing", "linspace"]


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


def snr(alpha_bar: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) (Kingma et al. 2021, VDM). Same shape."""
    return alpha_bar / (1 - alpha_bar)


def make_timesteps(num_timesteps: int, num_steps: int, spacing: Spacing = "leading") -> Tensor:
    """Descending sampling timesteps, int64 [num_steps] in [0, T-1].

    The spacings of Lin et al. 2024 ("Common diffusion noise schedules and sample steps are
    flawed", table 2), exactly as diffusers' ``timestep_spacing`` with ``steps_offset=0``:
    - "leading":  ``arange(n) * (T // n)`` reversed; the last step is t = 0 but the first is below
      T - 1 when n does not divide T.
    - "trailing": ``round(T - i * T / n) - 1``; starts at T - 1 (recommended by Lin et al.).
    - "linspace": ``round(linspace(0, T - 1, n))`` reversed; covers both ends.
    numpy does the float arithmetic so rounding ties fall exactly as in diffusers; unlike
    diffusers' ``arange(T, 0, -T / n)``, "trailing" always returns exactly ``num_steps`` values.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"num_steps must be in [1, {num_timesteps}] (the training timesteps), got {num_steps}"
        )
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
