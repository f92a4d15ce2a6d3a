"""A closed-form test bed for samplers: Gaussian data and its exact eps-denoiser.

For data x0 ~ N(mu, Sigma), VP diffusion's marginal is x_t ~ N(sqrt(ab) mu, C_t) with
C_t = ab Sigma + (1 - ab) I, and Gaussian conditioning gives the exact (MMSE) denoiser
E[eps | x_t] = sqrt(1 - ab) C_t^{-1} (x_t - sqrt(ab) mu). Every sampler here is then an affine
map of its initial noise (plus, for DDPM, of its step noise), so its output is exactly Gaussian
and a deterministic sampler's output moments can be computed exactly by probing it with d + 1
inputs. Used by tests/unit/test_samplers_gaussian.py and benchmarks/bench_sampler_accuracy.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_core.samplers import Denoiser, SamplerFn
from diffusion_core.seeding import ImageNoise

SHAPE = (1, 2, 2)  # one 2x2 "image": a 4-dimensional distribution
DIM = 4
MU = torch.tensor([0.5, -1.0, 0.25, 1.5], dtype=torch.float64)
# Non-diagonal, eigenvalues spread over ~two decades so that low- and high-variance directions
# both matter.
_L = torch.tensor(
    [[1.2, 0.0, 0.0, 0.0], [0.6, 0.5, 0.0, 0.0], [-0.3, 0.2, 0.3, 0.0], [0.1, -0.4, 0.05, 0.15]],
    dtype=torch.float64,
)
SIGMA = _L @ _L.T


def marginal(alpha_bar_t: float) -> tuple[Tensor, Tensor]:
    """Mean [d] and covariance [d, d] of x_t."""
    mean = alpha_bar_t**0.5 * MU
    cov = alpha_bar_t * SIGMA + (1 - alpha_bar_t) * torch.eye(DIM, dtype=torch.float64)
    return mean, cov


def exact_denoiser(alpha_bar: Tensor) -> Denoiser:
    """The exact E[eps | x_t] for the Gaussian data, as a sampler's ``Denoiser``."""
    alpha_bar = alpha_bar.to(torch.float64)

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        assert bool((t == t[0]).all())
        ab = float(alpha_bar[int(t[0])])
        mean, cov = marginal(ab)
        flat = x_t.reshape(x_t.shape[0], DIM)
        eps = (1 - ab) ** 0.5 * torch.linalg.solve(cov, (flat - mean).T).T
        return eps.reshape(x_t.shape)

    return denoise


def initial_x(alpha_bar_t: float, noise: ImageNoise) -> Tensor:
    """Draws from the exact marginal at the first timestep, so that only the sampler's
    discretisation separates its output from N(mu, Sigma). [B, *SHAPE]."""
    mean, cov = marginal(alpha_bar_t)
    z = noise.randn(SHAPE).reshape(len(noise), DIM)
    return (mean + z @ torch.linalg.cholesky(cov).T).reshape(len(noise), *SHAPE)


def monte_carlo(
    sampler: SamplerFn, timesteps: Tensor, alpha_bar: Tensor, noise: ImageNoise
) -> Tensor:
    """The sampler's outputs [len(noise), *SHAPE] from draws of the exact marginal at the first
    timestep (for DDPM, whose step noise makes its output moments Monte Carlo ones)."""
    x = initial_x(float(alpha_bar[timesteps[0]]), noise)
    return sampler(exact_denoiser(alpha_bar), x, timesteps, alpha_bar=alpha_bar, noise=noise)


def moments(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean [d] and covariance [d, d] of samples [N, *SHAPE]."""
    flat = samples.reshape(samples.shape[0], DIM)
    return flat.mean(0), torch.cov(flat.T)


def exact_moments(
    sampler: SamplerFn, timesteps: Tensor, alpha_bar: Tensor
) -> tuple[Tensor, Tensor]:
    """Exact output mean and covariance of a deterministic sampler started from the exact
    marginal: out = A z + b is affine in the standard-normal z, so out(0) = b and
    out(e_i) - b = A e_i; then mean = b, cov = A A^T."""
    mean0, cov0 = marginal(float(alpha_bar[timesteps[0]]))
    probes = torch.cat([torch.zeros(1, DIM, dtype=torch.float64), torch.eye(DIM)])
    x = (mean0 + probes @ torch.linalg.cholesky(cov0).T).reshape(DIM + 1, *SHAPE)
    unused = ImageNoise(range(DIM + 1))
    out = sampler(
        exact_denoiser(alpha_bar), x, timesteps, alpha_bar=alpha_bar, noise=unused
    ).reshape(DIM + 1, DIM)
    b, a = out[0], (out[1:] - out[0]).T
    return b, a @ a.T


def w2_distance(mean: Tensor, cov: Tensor) -> float:
    """2-Wasserstein (Frechet) distance between N(mean, cov) and the data N(MU, SIGMA):
    sqrt(|m - mu|^2 + tr(C + Sigma - 2 (C^1/2 Sigma C^1/2)^1/2)), FID's formula."""

    def sqrtm(m: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    root = sqrtm(cov)
    trace = torch.trace(cov + SIGMA - 2 * sqrtm(root @ SIGMA @ root))
    return float(((mean - MU).square().sum() + trace.clamp(min=0)).sqrt())


def std_error(cov: Tensor) -> float:
    """max_i |sqrt(C_ii) - sqrt(SIGMA_ii)|: the worst per-dimension error of the output's std."""
    return float((cov.diagonal().sqrt() - SIGMA.diagonal().sqrt()).abs().max())
