"""Power-function EMA and post-hoc EMA reconstruction (EDM2: Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Sec. 3 and Appendix C; NVlabs/edm2).

A power-function EMA at training time t averages the weights seen so far with the profile

    p_{t,gamma}(tau) = (gamma + 1) * tau^gamma / t^(gamma + 1),   0 <= tau <= t,

whose width relative to t is `sigma_rel` (Eq. 123). It is tracked with the per-update decay
beta = (1 - dt / t)^(gamma + 1) (Eq. 127). Keeping snapshots of two such EMAs every N steps lets
any other profile at any snapshot time be rebuilt after training as a linear combination of the
snapshots, with coefficients from a least-squares fit of the profiles (Eq. 151, Algorithm 3).

Time is counted in optimizer steps (EDM2 counts images; only ratios of times matter). The update
is exact in discrete time: after updates at steps t_1 < ... < t_n the average gives the weights of
update j the mass of the continuous profile on (t_{j-1}, t_j], since the decays telescope to
(t_{j-1} / t_n)^(gamma + 1). So a reconstruction is off only by the least-squares residual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# Above this sigma_rel the exponent would be negative (gamma = 0 gives 1/sqrt(12)): a profile that
# favours the earliest weights, for which sigma_rel is no longer one-to-one with gamma.
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)

Snapshot = tuple[int, float, Mapping[str, torch.Tensor]]  # (step, gamma, averaged tensors)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the profile p_{t,gamma}, EDM2 Eq. 123:

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
    """
    if not gamma > 0.0:
        raise ValueError(f"power-EMA exponent gamma={gamma!r} is invalid: expected gamma > 0")
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma whose profile has relative std `sigma_rel` (EDM2 Eq. 126, Algorithm 2).

    Squaring Eq. 123 gives the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with
    s = sigma_rel^-2; for 0 < sigma_rel < 1/sqrt(12) it has exactly one root gamma > 0.
    """
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(
            f"power-EMA sigma_rel={sigma_rel!r} is invalid: expected 0 < sigma_rel < "
            f"{MAX_SIGMA_REL:.4f} (e.g. EDM2's 0.05 or 0.10)"
        )
    s = float(sigma_rel) ** -2
    coeffs = [1.0, 7.0, 16.0 - s, 12.0 - s]
    gamma = float(max(r.real for r in np.roots(coeffs) if abs(r.imag) < 1e-9 * (1.0 + abs(r))))
    # One Newton step polishes the companion-matrix root to full double precision.
    f = ((gamma + 7.0) * gamma + 16.0 - s) * gamma + 12.0 - s
    df = (3.0 * gamma + 14.0) * gamma + 16.0 - s
    return gamma - f / df


def power_ema_beta(step: int, prev_step: int, gamma: float) -> float:
    """Decay for an update at `step` after the previous one at `prev_step` (EDM2 Eq. 127):

    beta = (1 - (step - prev_step) / step)^(gamma + 1) = (prev_step / step)^(gamma + 1).

    With an update every step this is the paper's (1 - 1/t)^(gamma + 1); the first update
    (prev_step = 0) gives beta = 0: the average starts as a copy of the weights.
    """
    if not 0 <= prev_step < step:
        raise ValueError(
            f"power-EMA update at step {step} after step {prev_step}: steps must increase, from 1"
        )
    return (prev_step / step) ** (gamma + 1.0)


def profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral of their product over tau (EDM2 Eq. 151).

    Both are supported on [0, min(t_a, t_b)], so with t_a <= t_b the integral is

        (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) t_b) * (t_a / t_b)^gamma_b.
    """
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    num = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** gamma_b
    return num / ((gamma_a + gamma_b + 1.0) * t_b)


def solve_coefficients(
    snapshot_steps: Sequence[int],
    snapshot_gammas: Sequence[float],
    target_step: int,
    target_gamma: float,
) -> list[float]:
    """Coefficients x_i with sum_i x_i p_i closest (in L2 over tau) to the target profile, where
    p_i = p_{snapshot_steps[i], snapshot_gammas[i]} (EDM2 Algorithm 3).

    The normal equations A x = b use A_ij = <p_i, p_j> and b_i = <p_i, p_target>. Like EDM2, x is
    rescaled to sum to 1 (the fit already sums to about 1), so a constant weight stays constant.
    """
    n = len(snapshot_steps)
    if n == 0 or n != len(snapshot_gammas):
        raise ValueError(
            f"post-hoc EMA needs >= 1 snapshot and one gamma per step; got {n} steps and "
            f"{len(snapshot_gammas)} gammas"
        )
    pairs = list(zip(snapshot_steps, snapshot_gammas, strict=True))
    if len(set(pairs)) != n:
        raise ValueError(f"post-hoc EMA snapshots repeat a (step, gamma) pair: {sorted(pairs)}")
    if any(t <= 0 for t in snapshot_steps) or target_step <= 0:
        raise ValueError(
            f"post-hoc EMA steps must be >= 1; got snapshots at {sorted(snapshot_steps)} and "
            f"target step {target_step}"
        )
    # 1. Gram matrix of the snapshot profiles and their products with the target (Eq. 151).
    a = np.empty((n, n), dtype=np.float64)
    b = np.empty(n, dtype=np.float64)
    for i, (t_i, g_i) in enumerate(pairs):
        b[i] = profile_inner_product(t_i, g_i, target_step, target_gamma)
        for j, (t_j, g_j) in enumerate(pairs):
            a[i, j] = profile_inner_product(t_i, g_i, t_j, g_j)
    # 2. Least squares: the normal equations (A is symmetric positive definite for distinct
    #    profiles, but ill-conditioned when many snapshots overlap, hence float64).
    x = np.linalg.solve(a, b)
    # 3. Unit total weight, as in EDM2's solve_posthoc_coefficients.
    return [float(v) for v in x / x.sum()]


def reconstruct(
    snapshots: Sequence[Snapshot],
    target_sigma_rel: float,
    target_step: int | None = None,
) -> dict[str, torch.Tensor]:
    """The power-function EMA with `target_sigma_rel` at `target_step` (default: the latest
    snapshot), as sum_i x_i * snapshot_i over the snapshots taken at or before that step.

    `snapshots` are (step, gamma, tensors) triples, e.g. from `PowerEMA.snapshot`. Floating
    tensors are summed in float64 (coefficients can be large with opposite signs, and the sum must
    not lose what they cancel) and returned in the snapshots' dtype, at least float32; other
    tensors (counters) are taken from the latest snapshot used.
    """
    if not snapshots:
        raise ValueError("post-hoc EMA reconstruction needs at least one snapshot")
    if target_step is None:
        target_step = max(step for step, _, _ in snapshots)
    used = sorted((s for s in snapshots if 0 < s[0] <= target_step), key=lambda s: (s[0], s[1]))
    if not used:
        raise ValueError(
            f"no snapshot at or before target step {target_step}; snapshots are at steps "
            f"{sorted({step for step, _, _ in snapshots})}"
        )
    coeffs = solve_coefficients(
        [step for step, _, _ in used],
        [gamma for _, gamma, _ in used],
        target_step,
        sigma_rel_to_gamma(target_sigma_rel),
    )
    latest = used[-1][2]
    out: dict[str, torch.Tensor] = {}
    for name, ref in latest.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for x, (step, _, tensors) in zip(coeffs, used, strict=True):
            if name not in tensors:
                raise ValueError(f"snapshot at step {step} lacks tensor {name!r}")
            acc.add_(tensors[name].to(device=ref.device, dtype=torch.float64), alpha=x)
        out[name] = acc.to(torch.promote_types(ref.dtype, torch.float32))
    return out


class PowerEMA:
    """Power-function EMAs of a set of tensors (a model's parameters), one per `sigma_rel`.

    `update(step, params)` applies `avg <- beta * avg + (1 - beta) * param` with `power_ema_beta`;
    steps count optimizer steps from 1 and may skip (an update every k steps stays exact). The
    state is plain tensors and numbers (`state_dict`), so a checkpoint resumes bit-for-bit.
    Floating tensors are averaged in at least float32; others (counters) are copied as they are.
    """

    def __init__(
        self, params: Mapping[str, torch.Tensor], sigma_rels: Sequence[float] = (0.05, 0.10)
    ) -> None:
        if not sigma_rels:
            raise ValueError("PowerEMA needs at least one sigma_rel, e.g. (0.05, 0.10)")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.step = 0  # the step of the last update; 0 = none yet
        self.averages: list[dict[str, torch.Tensor]] = [
            {name: _storage_copy(p) for name, p in params.items()} for _ in self.sigma_rels
        ]

    @torch.no_grad()
    def update(self, step: int, params: Mapping[str, torch.Tensor]) -> None:
        """Fold in the weights after optimizer step `step` (> the previous update's step)."""
        betas = [power_ema_beta(step, self.step, gamma) for gamma in self.gammas]
        if set(params) != set(self.averages[0]):
            raise ValueError(
                f"PowerEMA.update got tensors {sorted(params)}; it averages "
                f"{sorted(self.averages[0])}"
            )
        names = [n for n, a in self.averages[0].items() if a.is_floating_point()]
        # Every profile stores a tensor in the same dtype: cast the weights once, not per profile.
        src = [params[n].detach().to(self.averages[0][n].dtype) for n in names]
        for beta, avg in zip(betas, self.averages, strict=True):
            if names:
                # avg <- avg + (1 - beta) * (param - avg), fused per dtype/device group.
                torch._foreach_lerp_([avg[n] for n in names], src, 1.0 - beta)
            for n, a in avg.items():
                if not a.is_floating_point():
                    a.copy_(params[n])
        self.step = step

    def snapshot(self) -> list[Snapshot]:
        """(step, gamma, copy of the average) for each tracked profile: what training stores
        every N steps for `reconstruct`."""
        if self.step == 0:
            raise ValueError("PowerEMA.snapshot before the first update: nothing averaged yet")
        return [
            (self.step, gamma, {n: t.detach().clone() for n, t in avg.items()})
            for gamma, avg in zip(self.gammas, self.averages, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "step": self.step,
            "averages": [{n: t.clone() for n, t in avg.items()} for avg in self.averages],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"sigma_rels", "step", "averages"} - set(state)
        if missing:
            raise ValueError(f"PowerEMA state is missing keys {sorted(missing)}")
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise ValueError(
                f"PowerEMA state tracks sigma_rels {state['sigma_rels']}; this one tracks "
                f"{self.sigma_rels}"
            )
        for avg, saved in zip(self.averages, state["averages"], strict=True):
            if set(saved) != set(avg):
                raise ValueError(f"PowerEMA state holds tensors {sorted(saved)}, not {sorted(avg)}")
            for n, t in avg.items():
                t.copy_(saved[n])
        self.step = int(state["step"])


def _storage_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy to average into: floating tensors in at least float32 (bf16/fp16 would
    round away updates of weight (1 - beta) ~ (gamma + 1) / t late in training)."""
    t = t.detach()
    if t.is_floating_point():
        return t.to(torch.promote_types(t.dtype, torch.float32), copy=True)
    return t.clone()
