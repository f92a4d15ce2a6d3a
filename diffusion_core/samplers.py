"""Samplers for discrete-time VP diffusion: stateless functions sharing one signature.

Every sampler takes an eps-``Denoiser``, the initial noise ``x`` (float64 [B, C, H, W]), descending
int64 ``timesteps`` (from ``schedules.make_timesteps``), the schedule's ``alpha_bar`` and an
``ImageNoise`` for per-image randomness, and returns the x0 sample (float64). Step i goes from
timesteps[i] to timesteps[i + 1]; the last step goes to "t = -1", i.e. alpha_bar_prev = 1
(diffusers' ``set_alpha_to_one=True`` / ``final_sigmas_type="zero"``). Step maths is float64;
multistep history lives in local variables. ``callback(i, num_steps, x)`` sees x after step i.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from diffusion_core.objectives import Network, PredictionType, eps_from_x0, to_eps_x0, x0_from_eps
from diffusion_core.seeding import ImageNoise

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "heun"]
Callback = Callable[[int, int, Tensor], None]


class Denoiser(Protocol):
    """x_t float64 [B, C, H, W], t int64 [B] -> eps prediction, float64 [B, C, H, W]."""

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor: ...


class SamplerFn(Protocol):
    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        timesteps: Tensor,
        *,
        alpha_bar: Tensor,
        noise: ImageNoise,
        callback: Callback | None = None,
    ) -> Tensor: ...


def _schedule_at(x: Tensor, timesteps: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """Validate the inputs; (alpha_bar at each step, alpha_bar after it), float64 [n] on CPU."""
    if x.dtype != torch.float64:
        raise ValueError(f"samplers step in float64; got x of dtype {x.dtype}, pass x.double()")
    if timesteps.dim() != 1 or timesteps.numel() == 0 or timesteps.dtype.is_floating_point:
        raise ValueError(
            f"timesteps must be a non-empty 1-D integer tensor (see make_timesteps), got "
            f"{timesteps.dtype} of shape {tuple(timesteps.shape)}"
        )
    timesteps = timesteps.cpu()
    num_timesteps = alpha_bar.shape[0]
    if bool((timesteps[1:] >= timesteps[:-1]).any()) or not (
        int(timesteps.min()) >= 0 and int(timesteps.max()) < num_timesteps
    ):
        raise ValueError(
            f"timesteps must be strictly descending in [0, {num_timesteps - 1}], got "
            f"{timesteps.tolist()}"
        )
    alpha_bar_t = alpha_bar.detach().cpu().to(torch.float64)[timesteps]
    alpha_bar_prev = torch.cat([alpha_bar_t[1:], torch.ones(1, dtype=torch.float64)])
    return alpha_bar_t, alpha_bar_prev


def _at(denoiser: Denoiser, x: Tensor, t: Tensor) -> Tensor:
    """The denoiser at one timestep for the whole batch."""
    return denoiser(x, torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device))


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    alpha_bar: Tensor,
    noise: ImageNoise,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, algorithm 2) over strided timesteps.

    Each step samples the forward posterior q(x_prev | x_t, x0_hat) (DDPM eqs. 6-7) with
    beta_t = 1 - alpha_bar_t / alpha_bar_prev for a stride, and the "fixed small" variance
    beta_tilde. Matches diffusers' DDPMScheduler(variance_type="fixed_small", clip_sample=False).
    The last step (to alpha_bar = 1) has zero variance and draws no noise.
    """
    alpha_bar_t, alpha_bar_prev = _schedule_at(x, timesteps, alpha_bar)
    num_steps = len(timesteps)
    for i, t in enumerate(timesteps):
        ab_t, ab_prev = alpha_bar_t[i].item(), alpha_bar_prev[i].item()
        alpha_t, beta_t = ab_t / ab_prev, 1 - ab_t / ab_prev
        eps = _at(denoiser, x, t)

        # 1. predicted x0, DDPM eq. 15
        x0_hat = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5

        # 2. posterior mean mu_tilde(x_t, x0_hat), DDPM eq. 7
        x = (ab_prev**0.5 * beta_t / (1 - ab_t)) * x0_hat + (
            alpha_t**0.5 * (1 - ab_prev) / (1 - ab_t)
        ) * x

        # 3. add noise with the posterior variance beta_tilde, DDPM eq. 7
        if i < num_steps - 1:
            variance = (1 - ab_prev) / (1 - ab_t) * beta_t
            x = x + variance**0.5 * noise.randn(tuple(x.shape[1:])).to(x.device)
        if callback is not None:
            callback(i, num_steps, x)
    return x


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    alpha_bar: Tensor,
    noise: ImageNoise,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16); eta = 0 is deterministic.

    eta = 1 is DDPM's ancestral sampler. Matches diffusers' DDIMScheduler(set_alpha_to_one=True,
    clip_sample=False) with ``variance_noise`` = this sampler's per-image draws.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM), got {eta}")
    alpha_bar_t, alpha_bar_prev = _schedule_at(x, timesteps, alpha_bar)
    num_steps = len(timesteps)
    for i, t in enumerate(timesteps):
        ab_t, ab_prev = alpha_bar_t[i].item(), alpha_bar_prev[i].item()
        eps = _at(denoiser, x, t)

        # 1. predicted x0, DDIM eq. 12
        x0_hat = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5

        # 2. sigma_t(eta), DDIM eq. 16
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5

        # 3. x_prev = sqrt(ab_prev) x0_hat + "direction pointing to x_t" + noise, DDIM eq. 12
        x = ab_prev**0.5 * x0_hat + (1 - ab_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * noise.randn(tuple(x.shape[1:])).to(x.device)
        if callback is not None:
            callback(i, num_steps, x)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    alpha_bar: Tensor,
    noise: ImageNoise,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2): a deterministic
    second-order multistep solver of the probability-flow ODE in the data (x0) prediction, with
    alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma).

    The first step is first order (no history; it equals DDIM), the last step lands on
    sigma = 0 where the update is exactly x0_hat. Matches diffusers'
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", final_sigmas_type="zero") on the same timesteps.
    ``noise`` is unused (the solver is deterministic); it is part of the shared signature.
    """
    alpha_bar_t, alpha_bar_prev = _schedule_at(x, timesteps, alpha_bar)
    num_steps = len(timesteps)
    alphas, sigmas = alpha_bar_t.sqrt().tolist(), (1 - alpha_bar_t).sqrt().tolist()
    lambdas = (0.5 * (alpha_bar_t.log() - (-alpha_bar_t).log1p())).tolist()
    x0_hat_before: Tensor | None = None
    for i, t in enumerate(timesteps):
        eps = _at(denoiser, x, t)

        # 1. data prediction x0_hat = (x - sigma eps) / alpha
        x0_hat = (x - sigmas[i] * eps) / alphas[i]
        if i == num_steps - 1:
            # 2'. sigma_next = 0: exp(-h) = 0 and the first-order update is x0_hat itself
            x = x0_hat
        else:
            # 2. step size in log-SNR, h = lambda_next - lambda_t
            h = lambdas[i + 1] - lambdas[i]

            # 3. D = x0_hat, extrapolated with the previous x0_hat after the first step,
            # algorithm 2 with r = h_before / h (diffusers' "midpoint" form)
            d = x0_hat
            if x0_hat_before is not None:
                r = (lambdas[i] - lambdas[i - 1]) / h
                d = x0_hat + (x0_hat - x0_hat_before) / (2 * r)

            # 4. exponential-integrator update, algorithm 2
            x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * math.expm1(-h) * d
            x0_hat_before = x0_hat
        if callback is not None:
            callback(i, num_steps, x)
    return x


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    alpha_bar: Tensor,
    noise: ImageNoise,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, "EDM",
    algorithm 1, deterministic: S_churn = 0), in the VP parametrisation of EDM table 1:
    sigma = sqrt((1 - alpha_bar) / alpha_bar), x_tilde = x / sqrt(alpha_bar), and
    d x_tilde / d sigma = eps(x_tilde sqrt(alpha_bar), t) (EDM eq. 4 with x scaled).

    Why Heun and not Euler: Euler in exactly these variables *is* DDIM (eta = 0), so it would add
    nothing; Heun is a genuinely different, second-order integrator. Costs 2 NFE per step except
    the last (to sigma = 0, an Euler step as in EDM): 2 n - 1 NFE for n timesteps. Corrections
    evaluate the denoiser at the next discrete timestep, so no timestep interpolation is needed.
    ``noise`` is unused; it is part of the shared signature.

    Caveat: the trapezoid rule assumes d varies slowly across a step. From a huge sigma_max (the
    cosine schedule's clipped end: t = T - 1 has sigma ~ 2e4 vs DDPM-linear's ~157) the first
    step is wildly inaccurate unless steps are many; prefer DDIM/DPM-Solver++ there, or start
    below T - 1 ("leading" spacing). See benchmarks/results/sampler_accuracy.md.
    """
    alpha_bar_t, alpha_bar_prev = _schedule_at(x, timesteps, alpha_bar)
    num_steps = len(timesteps)
    sigmas = ((1 - alpha_bar_t) / alpha_bar_t).sqrt().tolist()
    sigmas_next = ((1 - alpha_bar_prev) / alpha_bar_prev).sqrt().tolist()
    x_tilde = x / alpha_bar_t[0].item() ** 0.5
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas_next[i]

        # 1. slope d_i = (x_tilde - D(x_tilde)) / sigma = eps_hat, EDM alg. 1 line 4
        d = _at(denoiser, x_tilde / (1 + sigma**2) ** 0.5, t)

        # 2. Euler step, EDM alg. 1 line 5
        x_next = x_tilde + (sigma_next - sigma) * d

        # 3. second-order correction unless sigma_next = 0, EDM alg. 1 lines 6-8
        if i < num_steps - 1:
            d_next = _at(denoiser, x_next / (1 + sigma_next**2) ** 0.5, timesteps[i + 1])
            x_next = x_tilde + (sigma_next - sigma) * (d + d_next) / 2
        x_tilde = x_next
        if callback is not None:
            callback(i, num_steps, x_tilde / (1 + sigma_next**2) ** 0.5)
    return x_tilde


SAMPLERS: dict[str, SamplerFn] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "heun": sample_heun,
}
assert set(SAMPLERS) == set(get_args(SamplerName))


def sample(
    name: SamplerName,
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    alpha_bar: Tensor,
    noise: ImageNoise,
    eta: float = 0.0,
    callback: Callback | None = None,
) -> Tensor:
    """Run the named sampler; ``eta`` applies to "ddim" only. Returns x0 samples, float64."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} unknown; choose one of: {', '.join(SAMPLERS)}")
    if name == "ddim":
        return sample_ddim(
            denoiser, x, timesteps, alpha_bar=alpha_bar, noise=noise, eta=eta, callback=callback
        )
    if eta != 0.0:
        raise ValueError(f"eta={eta} applies to the 'ddim' sampler only, not {name!r}; set eta=0")
    return SAMPLERS[name](
        denoiser, x, timesteps, alpha_bar=alpha_bar, noise=noise, callback=callback
    )


def network_evaluations(name: SamplerName, steps: int, *, guided: bool = False) -> int:
    """Network evaluations (NFE) per image of `name` over `steps` timesteps: one per step, Heun's
    2 n - 1 (no correction on its last step, EDM alg. 1). Classifier-free guidance evaluates the
    network on the conditional and the unconditional input (one batch of 2B): twice as many."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} unknown; choose one of: {', '.join(SAMPLERS)}")
    per_image = 2 * steps - 1 if name == "heun" else steps
    return 2 * per_image if guided else per_image


def make_eps_denoiser(
    net: Network,
    *,
    alpha_bar: Tensor,
    prediction_type: PredictionType,
    class_labels: Tensor | None = None,
    guidance_scale: float = 1.0,
    null_label: int | None = None,
    dtype: torch.dtype = torch.float32,
    clip_x0: float | None = None,
) -> Denoiser:
    """Wrap ``net(x_t, t, class_labels)`` (eps, v or x0 prediction) as an eps-``Denoiser``.

    x_t is cast float64 -> ``dtype`` at the network boundary and the prediction back to float64
    before the conversion to eps (which uses the float64 x_t). With ``guidance_scale != 1`` the
    conditional (class_labels [B]) and unconditional (``null_label``) passes run as one batch of
    2B and are mixed by classifier-free guidance, eps = eps_u + scale (eps_c - eps_u) (Ho &
    Salimans 2022, eq. 6 with w = scale - 1). The network runs under ``torch.no_grad``.

    With ``clip_x0 = c`` the predicted clean image is clamped to [-c, c] and eps recomputed from it
    (DDPM's and DDIM's reference samplers, and diffusers' ``clip_sample``, do this for data in
    [-1, 1]). A deterministic sampler needs it: at the noisiest step x0 = (x_t - sigma eps) / alpha
    multiplies any error in eps by 1 / alpha (~160 for the linear schedule), so a starting noise
    whose norm the network under-predicts by a few percent ends as a saturated noise image.
    """
    guide = guidance_scale != 1.0
    if guide and (class_labels is None or null_label is None):
        raise ValueError(
            f"guidance_scale={guidance_scale} needs class_labels and null_label (got "
            f"class_labels={'None' if class_labels is None else 'a tensor'}, "
            f"null_label={null_label}); use guidance_scale=1 for an unguided model"
        )
    alpha_bar = alpha_bar.to(torch.float64)

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        labels = class_labels
        if guide:
            assert class_labels is not None and null_label is not None
            x_t, t = torch.cat([x_t, x_t]), torch.cat([t, t])
            labels = torch.cat([class_labels, torch.full_like(class_labels, null_label)])
        # Samplers step all images together: one timestep row, broadcast inside the network.
        t_net = t[:1] if bool((t == t[0]).all()) else t
        with torch.no_grad():
            pred = net(x_t.to(dtype), t_net, labels).to(torch.float64)
        alpha_bar_t = alpha_bar.to(x_t.device)[t]
        eps, _ = to_eps_x0(pred, x_t, alpha_bar_t, prediction_type)
        if guide:
            # classifier-free guidance, Ho & Salimans 2022 eq. 6
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
            x_t, alpha_bar_t = x_t.chunk(2)[0], alpha_bar_t.chunk(2)[0]
        if clip_x0 is not None:
            x0 = x0_from_eps(eps, x_t, alpha_bar_t).clamp(-clip_x0, clip_x0)
            eps = eps_from_x0(x0, x_t, alpha_bar_t)
        return eps

    return denoise
