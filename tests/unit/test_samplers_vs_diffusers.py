"""Our samplers against diffusers' schedulers, step for step, on a fixed fake model.

Both sides see the same model (a fixed random linear map of x_t plus a function of t), the same
float64 alpha_bar (ours, written over diffusers' float32 ``alphas_cumprod``: in float32 its
1 - alpha_bar_t / alpha_bar_prev cancels to ~1e-4 relative error at small strides), the same
timesteps and the same noise. Every intermediate x is compared (our callback vs diffusers'
``prev_sample``) with relative error <= 1e-5; what remains for DPM-Solver is its float32 sigmas
and state (it upcasts the sample to float32 only).

diffusers options that correspond to our semantics (last step to alpha_bar_prev = 1):
- ddpm: DDPMScheduler(variance_type="fixed_small", clip_sample=False, prediction_type="epsilon"),
  ``set_timesteps(timesteps=ours)``; its variance noise (drawn for t > 0) is our per-image noise.
- ddim: DDIMScheduler(set_alpha_to_one=True, clip_sample=False, timestep_spacing=same,
  steps_offset=0), ``set_timesteps(n)``, ``variance_noise`` = our per-image noise. diffusers'
  DDIM steps to t - T // n, which is our next timestep for "leading" spacing and for "trailing"
  when n divides T; for "linspace" diffusers' DDIM skips to timesteps not in its own list, so
  that case is not compared.
- dpmpp_2m: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", final_sigmas_type="zero", lower_order_final=True),
  ``set_timesteps(timesteps=ours)``. final_sigmas_type="zero" makes the last step first order
  and land on x0_hat, as ours; with solver_order=2, lower_order_final changes nothing else.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

from diffusion_core.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m
from diffusion_core.schedules import alpha_bar_from_betas, make_betas, make_timesteps
from diffusion_core.seeding import ImageNoise

T = 1000
SHAPE = (2, 3, 4, 4)
SEEDS = [11, 12]
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
TOL = 1e-5


class FakeModel:
    """eps(x_t, t) = sqrt(1 - ab_t) x_t + 0.1 (W x_t + b sin(t / 100 + phase)): fixed,
    deterministic, t-dependent. The first term is the exact eps of N(0, I) data; without it the
    x0 prediction at alpha_bar ~ 1e-9 (cosine's end) blows up to ~1e4 and the comparison would
    only measure diffusers' float32 coefficients amplified by that cancellation."""

    def __init__(self, alpha_bar: Tensor) -> None:
        g = torch.Generator().manual_seed(0)
        d = SHAPE[1] * SHAPE[2] * SHAPE[3]
        self.alpha_bar = alpha_bar
        self.w = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.phase = torch.rand(d, generator=g, dtype=torch.float64)

    def __call__(self, x_t: Tensor, t: Tensor | int) -> Tensor:
        t = torch.as_tensor(t).reshape(-1)
        flat = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        scale = (1 - self.alpha_bar[t]).sqrt().reshape(-1, 1)
        fixed = flat @ self.w.T + self.b * torch.sin(t.reshape(-1, 1) / 100 + self.phase)
        return (scale * flat + 0.1 * fixed).reshape(x_t.shape)


def scheduler_kwargs(kind: str) -> dict:
    return dict(
        num_train_timesteps=T,
        beta_schedule=DIFFUSERS_SCHEDULE[kind],
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
    )


def use_float64_schedule(scheduler, kind: str) -> Tensor:
    """Put our float64 alpha_bar (equal to diffusers' to float32 precision, see
    test_schedules.py) into the scheduler, and return it."""
    alpha_bar = alpha_bar_from_betas(make_betas(kind, T))
    assert torch.allclose(scheduler.alphas_cumprod.double(), alpha_bar, rtol=1e-5, atol=1e-12)
    scheduler.alphas_cumprod = alpha_bar.clone()
    return alpha_bar


def run_ours(sampler, alpha_bar: Tensor, timesteps: Tensor, **kwargs) -> list[Tensor]:
    xs: list[Tensor] = []
    noise = ImageNoise(SEEDS)
    x = noise.randn(SHAPE[1:])
    sampler(
        FakeModel(alpha_bar),
        x,
        timesteps,
        alpha_bar=alpha_bar,
        noise=noise,
        callback=lambda i, n, x: xs.append(x.clone()),
        **kwargs,
    )
    return xs


def run_diffusers(scheduler, timesteps: Tensor, step_kwargs) -> list[Tensor]:
    """Drive a diffusers scheduler; step_kwargs(i) gives extra kwargs for step i."""
    model = FakeModel(scheduler.alphas_cumprod.to(torch.float64))
    x = ImageNoise(SEEDS).randn(SHAPE[1:])  # the same initial noise as ours
    xs = []
    for i, t in enumerate(timesteps):
        x = scheduler.step(model(x, int(t)), t, x, **step_kwargs(i)).prev_sample
        xs.append(x.clone())
    return xs


def max_relative_error(ours: list[Tensor], theirs: list[Tensor]) -> float:
    assert len(ours) == len(theirs)
    return max(float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs, strict=True))


CASES = [
    (kind, spacing, n)
    for kind in ("linear", "cosine")
    for spacing in ("leading", "trailing", "linspace")
    for n in (7, 20)
]


@pytest.mark.parametrize("kind, spacing, n", CASES)
def test_ddpm_matches_diffusers(kind: str, spacing: str, n: int, monkeypatch) -> None:
    scheduler = DDPMScheduler(
        **scheduler_kwargs(kind), variance_type="fixed_small", clip_sample=False
    )
    timesteps = make_timesteps(T, n, spacing)
    alpha_bar = use_float64_schedule(scheduler, kind)
    scheduler.set_timesteps(timesteps=timesteps.tolist())

    # diffusers draws its variance noise inside step(); hand it our per-image stream instead
    twin = ImageNoise(SEEDS)
    twin.randn(SHAPE[1:])  # skip the initial noise, as our sampler's stream does
    monkeypatch.setattr(
        "diffusers.schedulers.scheduling_ddpm.randn_tensor",
        lambda shape, **kw: twin.randn(tuple(shape[1:])).to(kw.get("dtype")),
    )
    theirs = run_diffusers(scheduler, timesteps, lambda i: {})
    ours = run_ours(sample_ddpm, alpha_bar, timesteps)
    assert max_relative_error(ours, theirs) <= TOL


DDIM_CASES = [
    (kind, spacing, n)
    for kind, spacing, n in CASES
    if spacing == "leading" or (spacing == "trailing" and T % n == 0)
]


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("kind, spacing, n", DDIM_CASES)
def test_ddim_matches_diffusers(kind: str, spacing: str, n: int, eta: float) -> None:
    scheduler = DDIMScheduler(
        **scheduler_kwargs(kind),
        set_alpha_to_one=True,
        clip_sample=False,
        timestep_spacing=spacing,
        steps_offset=0,
    )
    alpha_bar = use_float64_schedule(scheduler, kind)
    scheduler.set_timesteps(n)
    timesteps = make_timesteps(T, n, spacing)
    assert torch.equal(scheduler.timesteps, timesteps)

    twin = ImageNoise(SEEDS)
    twin.randn(SHAPE[1:])

    def step_kwargs(i: int) -> dict:
        if eta == 0:
            return {"eta": 0.0}
        # the last step has sigma = 0: diffusers still adds 0 * noise, ours draws nothing
        last = i == n - 1
        noise = torch.zeros(SHAPE, dtype=torch.float64) if last else twin.randn(SHAPE[1:])
        return {"eta": eta, "variance_noise": noise}

    theirs = run_diffusers(scheduler, timesteps, step_kwargs)
    ours = run_ours(sample_ddim, alpha_bar, timesteps, eta=eta)
    assert max_relative_error(ours, theirs) <= TOL


@pytest.mark.parametrize("kind, spacing, n", CASES)
def test_dpmpp_2m_matches_diffusers(kind: str, spacing: str, n: int) -> None:
    scheduler = DPMSolverMultistepScheduler(
        **scheduler_kwargs(kind),
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    timesteps = make_timesteps(T, n, spacing)
    alpha_bar = use_float64_schedule(scheduler, kind)
    scheduler.set_timesteps(timesteps=timesteps.tolist())

    theirs = run_diffusers(scheduler, timesteps, lambda i: {})
    ours = run_ours(sample_dpmpp_2m, alpha_bar, timesteps)
    assert max_relative_error(ours, theirs) <= TOL
