"""Power-function EMA and post-hoc reconstruction (EDM2): the sigma_rel <-> gamma map against the
paper's numbers, the closed-form profile products against quadrature, the discrete update against
the continuous profile, and a reconstruction against an EMA tracked directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_core.phema import (
    MAX_SIGMA_REL,
    PowerEMA,
    Snapshot,
    gamma_to_sigma_rel,
    power_ema_beta,
    profile_inner_product,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)


def test_edm2_published_pairs() -> None:
    # EDM2 Sec. 3.1 stores sigma_rel 0.05 and 0.10, i.e. gamma 16.97 and 6.94 (the narrower
    # profile has the larger exponent); NVlabs/edm2 std_to_exp gives 16.9722 and 6.9372.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97220, abs=1e-5)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.93720, abs=1e-5)
    assert gamma_to_sigma_rel(0.0 + 1e-12) == pytest.approx(MAX_SIGMA_REL)


@pytest.mark.parametrize("sigma_rel", [0.005, 0.03, 0.05, 0.07, 0.10, 0.12, 0.2, 0.28])
def test_sigma_rel_gamma_round_trip(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-13)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.3, float("nan")])
def test_sigma_rel_out_of_range_is_refused(sigma_rel: float) -> None:
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(sigma_rel)


def test_sigma_rel_is_the_profiles_std_over_t() -> None:
    # Independent of Eq. 123: the std of p(tau) = (g+1) tau^g / t^(g+1) on [0, t], by quadrature.
    t, gamma = 3.0, sigma_rel_to_gamma(0.1)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    tau = (nodes + 1.0) * t / 2.0
    p = (gamma + 1.0) * tau**gamma / t ** (gamma + 1.0) * t / 2.0 * weights
    mean = float(np.sum(p * tau))
    std = math.sqrt(float(np.sum(p * (tau - mean) ** 2)))
    assert float(np.sum(p)) == pytest.approx(1.0, rel=1e-12)
    assert std / t == pytest.approx(0.1, rel=1e-10)


@pytest.mark.parametrize(
    ("t_a", "g_a", "t_b", "g_b"),
    [(100, 6.9, 100, 17.0), (40, 17.0, 100, 6.9), (250, 5.3, 90, 11.2)],
)
def test_inner_product_matches_quadrature(t_a: int, g_a: float, t_b: int, g_b: float) -> None:
    end = min(t_a, t_b)
    nodes, weights = np.polynomial.legendre.leggauss(300)
    tau = (nodes + 1.0) * end / 2.0
    p_a = (g_a + 1.0) * tau**g_a / t_a ** (g_a + 1.0)
    p_b = (g_b + 1.0) * tau**g_b / t_b ** (g_b + 1.0)
    numeric = float(np.sum(p_a * p_b * weights) * end / 2.0)
    assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-10)
    assert profile_inner_product(t_b, g_b, t_a, g_a) == profile_inner_product(t_a, g_a, t_b, g_b)


@pytest.mark.parametrize("every", [1, 3])
def test_update_weights_are_the_profile_mass_per_interval(every: int) -> None:
    # Feeding one-hot vectors (step tau -> e_tau) makes the average equal its weights: update j
    # must weigh (t_j^(g+1) - t_{j-1}^(g+1)) / t^(g+1), the profile's mass on (t_{j-1}, t_j].
    n = 60
    ema = PowerEMA({"w": torch.zeros(n + 1, dtype=torch.float64)}, sigma_rels=(0.05, 0.2))
    steps = list(range(every, n + 1, every))
    for t in steps:
        ema.update(t, {"w": torch.nn.functional.one_hot(torch.tensor(t), n + 1).double()})
    for gamma, avg in zip(ema.gammas, ema.averages, strict=True):
        expected = torch.zeros(n + 1, dtype=torch.float64)
        prev = 0
        for t in steps:
            expected[t] = (t ** (gamma + 1) - prev ** (gamma + 1)) / steps[-1] ** (gamma + 1)
            prev = t
        torch.testing.assert_close(avg["w"], expected, rtol=1e-12, atol=1e-15)
        assert float(avg["w"].sum()) == pytest.approx(1.0, rel=1e-12)


Toy = tuple[list[Snapshot], dict[int, tuple[PowerEMA, torch.Tensor]]]


def _toy_training(steps: int, every: int, seed: int) -> Toy:
    """A parameter vector under noisy SGD-like updates with a slow drift: snapshots of sigma_rel
    0.05 and 0.10 (float32, as stored) every `every` steps, plus EMAs tracked directly in float64
    (sigma_rel 0.03, 0.07, 0.12), kept with the weights at step 1500 and at the last one."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(256, dtype=torch.float64)
    tracked = PowerEMA({"w": theta.float()}, sigma_rels=(0.05, 0.10))
    direct = PowerEMA({"w": theta}, sigma_rels=(0.03, 0.07, 0.12))
    snapshots: list[Snapshot] = []
    kept: dict[int, tuple[PowerEMA, torch.Tensor]] = {}
    for t in range(1, steps + 1):
        theta += 0.01 * torch.randn(theta.shape, dtype=torch.float64, generator=gen) + 0.002
        tracked.update(t, {"w": theta.float()})
        direct.update(t, {"w": theta})
        if t % every == 0:
            snapshots += tracked.snapshot()
        if t in (1500, steps):
            copy = PowerEMA({"w": theta}, sigma_rels=direct.sigma_rels)
            copy.load_state_dict(direct.state_dict())
            kept[t] = (copy, theta.clone())
    return snapshots, kept


@pytest.fixture(scope="module")
def toy() -> Toy:
    return _toy_training(steps=2000, every=100, seed=0)


# Error = |reconstruction - direct EMA| / |direct EMA - weights at that step|. Measured (seeds
# 0-3, with and without the drift) at step 2000: <= 2.7e-4 at sigma_rel 0.07 (between the
# snapshots' 0.05 and 0.10), <= 1.5e-4 at 0.12 (wider than both), <= 7.3e-3 at 0.03 (narrower than
# both: the least-squares fit leaves 2.6 % of the profile's L2 norm there, 0.25 % at 0.07); at step
# 1500 (15 snapshots per profile): <= 3.6e-4, 3.3e-4 and 9.5e-3. Tolerances: 2e-3 and 3e-2.
@pytest.mark.parametrize(("sigma_rel", "tolerance"), [(0.07, 2e-3), (0.12, 2e-3), (0.03, 3e-2)])
@pytest.mark.parametrize("target_step", [2000, 1500])
def test_reconstruction_matches_directly_tracked_ema(
    toy: Toy,
    sigma_rel: float,
    tolerance: float,
    target_step: int,
) -> None:
    snapshots, kept = toy
    direct, theta = kept[target_step]
    expected = direct.averages[direct.sigma_rels.index(sigma_rel)]["w"]
    got = reconstruct(snapshots, sigma_rel, target_step=target_step)["w"]
    assert got.dtype == torch.float32
    error = float((got.double() - expected).norm() / (expected - theta).norm())
    assert error < tolerance, f"sigma_rel {sigma_rel} at step {target_step}: error {error:.2e}"


def test_reconstructing_a_snapshots_own_profile_returns_it(toy: Toy) -> None:
    snapshots, kept = toy
    theta = kept[2000][1]
    for step, sigma_rel in [(2000, 0.05), (2000, 0.10), (1000, 0.10)]:
        (own,) = [
            s[2]["w"]
            for s in snapshots
            if s[0] == step and s[1] == pytest.approx(sigma_rel_to_gamma(sigma_rel))
        ]
        got = reconstruct(snapshots, sigma_rel, target_step=step)["w"]
        assert float((got - own).norm() / (own - theta.float()).norm()) < 1e-6


def test_coefficients_sum_to_one_and_keep_a_constant(toy: Toy) -> None:
    snapshots, _ = toy
    steps = [s[0] for s in snapshots]
    gammas = [s[1] for s in snapshots]
    for sigma_rel in (0.03, 0.07, 0.12, 0.2):
        x = solve_coefficients(steps, gammas, 2000, sigma_rel_to_gamma(sigma_rel))
        assert sum(x) == pytest.approx(1.0, abs=1e-12)
    constant: list[Snapshot] = [(t, g, {"w": torch.full((3,), 2.5)}) for t, g, _ in snapshots]
    torch.testing.assert_close(reconstruct(constant, 0.09)["w"], torch.full((3,), 2.5))


def test_state_dict_resumes_exactly() -> None:
    gen = torch.Generator().manual_seed(1)
    weights = [{"w": torch.randn(5, generator=gen), "n": torch.tensor(t)} for t in range(1, 21)]
    whole = PowerEMA(weights[0], sigma_rels=(0.05, 0.10))
    for t, w in enumerate(weights, start=1):
        whole.update(t, w)
    first = PowerEMA(weights[0], sigma_rels=(0.05, 0.10))
    for t, w in enumerate(weights[:10], start=1):
        first.update(t, w)
    resumed = PowerEMA(weights[0], sigma_rels=(0.05, 0.10))
    resumed.load_state_dict(first.state_dict())
    for t, w in enumerate(weights[10:], start=11):
        resumed.update(t, w)
    assert resumed.step == whole.step == 20
    for a, b in zip(resumed.averages, whole.averages, strict=True):
        assert torch.equal(a["w"], b["w"])
        assert int(a["n"]) == 20


def test_user_errors_are_precise() -> None:
    ema = PowerEMA({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="before the first update"):
        ema.snapshot()
    ema.update(5, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="steps must increase"):
        ema.update(5, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="got tensors"):
        ema.update(6, {"v": torch.ones(2)})
    with pytest.raises(ValueError, match="repeat"):
        solve_coefficients([10, 10], [6.9, 6.9], 10, 6.9)
    with pytest.raises(ValueError, match="no snapshot at or before"):
        reconstruct(ema.snapshot(), 0.1, target_step=4)
    with pytest.raises(ValueError, match="sigma_rels"):
        PowerEMA({"w": torch.zeros(2)}, sigma_rels=(0.1,)).load_state_dict(ema.state_dict())
    assert power_ema_beta(1, 0, 6.9) == 0.0
    assert power_ema_beta(10, 9, 6.9) == pytest.approx((1 - 1 / 10) ** 7.9)
