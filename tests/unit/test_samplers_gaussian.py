"""Samplers driven by the exact denoiser of Gaussian data (see tests/support/gaussian_oracle.py).

Data: 4-dim N(MU, SIGMA), non-diagonal, eigenvalues 0.010, 0.085, 0.44, 1.93. Sampling starts
from the exact marginal at the first timestep, so only discretisation separates a sampler's
output from the data. Schedules: T = 1000, "trailing" spacing unless a test names another.
Errors: W2 (`w2_distance`) and the max std error (`std_error`).
"""

from __future__ import annotations

import pytest
import torch

from diffusion_core.samplers import SAMPLERS
from diffusion_core.schedules import Spacing, alpha_bar_from_betas, make_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from tests.support.gaussian_oracle import (
    MU,
    SIGMA,
    exact_moments,
    moments,
    monte_carlo,
    std_error,
    w2_distance,
)

LINEAR = alpha_bar_from_betas(make_betas("linear", 1000))
COSINE = alpha_bar_from_betas(make_betas("cosine", 1000))
N = 2000

# Monte Carlo, N = 2000: the standard error of a mean coordinate is <= sqrt(1.44 / N) = 0.027 and
# of a covariance entry <= 1.44 sqrt(2 / N) = 0.046; the tolerances allow ~4 standard errors
# plus each sampler's discretisation bias at that step count (measured: W2 <= 0.066).
MEAN_TOL = 0.1
COV_TOL = 0.2


def run_monte_carlo(name: str, num_steps: int) -> torch.Tensor:
    timesteps = make_timesteps(1000, num_steps, "trailing")
    return monte_carlo(SAMPLERS[name], timesteps, LINEAR, ImageNoise(range(N)))


@pytest.fixture(scope="module")
def ddpm_samples() -> dict[int, torch.Tensor]:
    """DDPM at 10 and 100 steps, shared by two tests (per-image noise makes it the slow one)."""
    return {n: run_monte_carlo("ddpm", n) for n in (10, 100)}


@pytest.mark.parametrize(
    "name, num_steps", [("ddpm", 100), ("ddim", 50), ("dpmpp_2m", 20), ("heun", 20)]
)
def test_sample_moments_match_the_data(name: str, num_steps: int, ddpm_samples) -> None:
    out = ddpm_samples[num_steps] if name == "ddpm" else run_monte_carlo(name, num_steps)
    mean, cov = moments(out)
    assert float((mean - MU).abs().max()) < MEAN_TOL
    assert float((cov - SIGMA).abs().max()) < COV_TOL


def test_exact_moments_agree_with_monte_carlo() -> None:
    """The affine-probe moments used below are what sampling actually produces."""
    timesteps = make_timesteps(1000, 10, "trailing")
    mc_mean, mc_cov = moments(run_monte_carlo("dpmpp_2m", 10))
    mean, cov = exact_moments(SAMPLERS["dpmpp_2m"], timesteps, LINEAR)
    assert float((mc_mean - mean).abs().max()) < MEAN_TOL / 2
    assert float((mc_cov - cov).abs().max()) < COV_TOL / 2


# Exact W2 error at 100 steps, measured: linear ddim 0.034, dpmpp_2m 0.0078, heun 0.0080;
# cosine ddim 0.022, dpmpp_2m 0.0023, heun 0.10 (Heun's first trapezoid step from cosine's
# sigma_max ~ 2e4 is poor; see sample_heun). Tolerances are ~1.5x those.
W2_TOL_AT_100 = {
    ("linear", "ddim"): 0.05,
    ("linear", "dpmpp_2m"): 0.012,
    ("linear", "heun"): 0.012,
    ("cosine", "ddim"): 0.035,
    ("cosine", "dpmpp_2m"): 0.004,
    ("cosine", "heun"): 0.15,
}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "heun"])
def test_deterministic_error_decreases_with_steps(kind: str, name: str) -> None:
    alpha_bar = LINEAR if kind == "linear" else COSINE
    errors = [
        w2_distance(*exact_moments(SAMPLERS[name], make_timesteps(1000, n, "trailing"), alpha_bar))
        for n in (10, 20, 50, 100)
    ]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < W2_TOL_AT_100[kind, name], errors


def test_ddpm_error_decreases_with_steps(ddpm_samples) -> None:
    errors = [w2_distance(*moments(ddpm_samples[n])) for n in (10, 100)]
    # measured ~0.41 and ~0.07; Monte Carlo noise in W2 at N = 2000 is ~0.03
    assert errors[1] < errors[0] / 3, errors


def test_dpmpp_2m_at_20_steps_vs_ddim_at_50() -> None:
    """DPM-Solver++(2M) at 20 steps is at least as accurate as DDIM at 50 on the cosine
    schedule (measured W2 0.032 vs 0.044), and within 5% of it on the linear one (0.0670 vs
    0.0656). With "leading" or "linspace" spacing it is not (0.17 vs 0.063 on linear): this
    data's smallest-variance direction (std 0.1) is resolved only at high SNR, where
    uniform-in-t steps are huge in log-SNR; see benchmarks/bench_sampler_accuracy.py."""
    for alpha_bar, slack in ((COSINE, 1.0), (LINEAR, 1.05)):
        dpmpp = w2_distance(
            *exact_moments(SAMPLERS["dpmpp_2m"], make_timesteps(1000, 20, "trailing"), alpha_bar)
        )
        ddim = w2_distance(
            *exact_moments(SAMPLERS["ddim"], make_timesteps(1000, 50, "trailing"), alpha_bar)
        )
        assert dpmpp <= slack * ddim, (dpmpp, ddim)


# Exact errors of DPM-Solver++(2M) at 20 steps (max std error / W2), measured:
#   linear: "logsnr" 0.0174 / 0.023, "trailing" 0.0208 / 0.067, "karras" 0.049 / 0.068;
#   cosine: "logsnr" 0.0192 / 0.025, "trailing" 0.0131 / 0.032, "karras" 0.052 / 0.072.
# diffusers' default DPMSolverMultistepScheduler (its "linspace": 999, 949, ..., 50) measures
# 0.0218 / 0.068 on linear and 0.0133 / 0.032 on cosine. Without the LAMBDA_MIN start, "logsnr"
# on cosine spends 7 of 20 steps in the clipped tail (t >= 993) and measures 0.0355 / 0.047.
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_2m_at_20_steps_with_logsnr_spacing(kind: str) -> None:
    alpha_bar = LINEAR if kind == "linear" else COSINE

    def errors(spacing: Spacing) -> tuple[float, float]:
        timesteps = make_timesteps(1000, 20, spacing, alpha_bar=alpha_bar)
        mean, cov = exact_moments(SAMPLERS["dpmpp_2m"], timesteps, alpha_bar)
        return std_error(cov), w2_distance(mean, cov)

    std_logsnr, w2_logsnr = errors("logsnr")
    assert std_logsnr <= 0.02, std_logsnr
    assert w2_logsnr < errors("trailing")[1], (w2_logsnr, errors("trailing"))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "heun"])
def test_error_decreases_with_steps_on_noise_level_spacings(
    kind: str, spacing: Spacing, name: str
) -> None:
    alpha_bar = LINEAR if kind == "linear" else COSINE
    errors = [
        w2_distance(
            *exact_moments(
                SAMPLERS[name], make_timesteps(1000, n, spacing, alpha_bar=alpha_bar), alpha_bar
            )
        )
        for n in (10, 20, 50, 100)
    ]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
