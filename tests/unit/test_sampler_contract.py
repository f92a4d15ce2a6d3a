"""The contract every entry of SAMPLERS keeps (diffusers' SchedulerCommonTest pattern)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import Tensor

from diffusion_core.samplers import SAMPLERS, SamplerName, make_eps_denoiser, sample
from diffusion_core.schedules import Spacing, alpha_bar_from_betas, cosine_betas, make_timesteps
from diffusion_core.seeding import ImageNoise

ALPHA_BAR = alpha_bar_from_betas(cosine_betas())
TIMESTEPS = make_timesteps(1000, 6, "trailing")
SHAPE = (3, 4, 4)
NULL = 10


class TinyNet(torch.nn.Module):
    """A class-conditional 'network' with per-pixel mixing: net(x_t, t, labels) -> v, say."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.embed = torch.nn.Embedding(11, 3)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        out = self.conv(x_t) * 0.1 + torch.sin(t.float() / 300).view(-1, 1, 1, 1)
        if labels is not None:
            out = out + 0.1 * self.embed(labels).view(-1, 3, 1, 1)
        return out


def run(
    name: str, seeds: list[int], scale: float = 1.0, labels: Tensor | None = None, callback=None
):
    torch.manual_seed(0)
    net = TinyNet()
    if labels is None:
        labels = torch.arange(len(seeds)) % 10
    denoiser = make_eps_denoiser(
        net,
        alpha_bar=ALPHA_BAR,
        prediction_type="v",
        class_labels=labels,
        guidance_scale=scale,
        null_label=NULL,
    )
    noise = ImageNoise(seeds)
    x = noise.randn(SHAPE)
    return sample(name, denoiser, x, TIMESTEPS, alpha_bar=ALPHA_BAR, noise=noise, callback=callback)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_contract(name: str) -> None:
    # shapes and dtype preserved
    out = run(name, [0, 1])
    assert out.shape == (2, *SHAPE) and out.dtype == torch.float64
    assert bool(torch.isfinite(out).all())

    # deterministic for the same seeds
    assert torch.equal(run(name, [0, 1]), out)

    # an image depends on its seed only: batch of 1 vs batch of 8
    seeds = [42, 7, 3, 5, 0, 1, 2, 4]
    labels = torch.tensor([4, 0, 1, 2, 3, 5, 6, 7])
    alone = run(name, [42], labels=labels[:1], scale=2.0)
    in_batch = run(name, seeds, labels=labels, scale=2.0)
    torch.testing.assert_close(in_batch[0], alone[0], rtol=1e-6, atol=1e-6)

    # guidance scale 1 is no guidance
    torch.testing.assert_close(run(name, [0, 1], scale=1.0), out, rtol=0, atol=0)
    assert not torch.allclose(run(name, [0, 1], scale=3.0), out)

    # callback once per step, with the step index and count
    calls: list[tuple[int, int, tuple[int, ...]]] = []
    run(name, [0, 1], callback=lambda i, n, x: calls.append((i, n, tuple(x.shape))))
    assert calls == [(i, len(TIMESTEPS), (2, *SHAPE)) for i in range(len(TIMESTEPS))]


@pytest.mark.parametrize("spacing", get_args(Spacing))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_takes_every_spacing(name: SamplerName, spacing: Spacing) -> None:
    timesteps = make_timesteps(1000, 6, spacing, alpha_bar=ALPHA_BAR)
    noise = ImageNoise([0, 1])
    denoiser = make_eps_denoiser(TinyNet(), alpha_bar=ALPHA_BAR, prediction_type="v")
    steps: list[int] = []
    out = sample(
        name,
        denoiser,
        noise.randn(SHAPE),
        timesteps,
        alpha_bar=ALPHA_BAR,
        noise=noise,
        callback=lambda i, n, x: steps.append(i),
    )
    assert out.shape == (2, *SHAPE) and bool(torch.isfinite(out).all())
    assert steps == list(range(len(timesteps)))


def test_make_eps_denoiser_batches_cond_and_uncond_in_one_forward() -> None:
    seen: list[Tensor | None] = []

    def net(x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        seen.append(labels)
        assert x_t.dtype == torch.float32
        return (labels.float() if labels is not None else torch.zeros(len(x_t))).view(
            -1, 1, 1, 1
        ) * torch.ones_like(x_t)

    denoiser = make_eps_denoiser(
        net,
        alpha_bar=ALPHA_BAR,
        prediction_type="epsilon",
        class_labels=torch.tensor([2, 4]),
        guidance_scale=3.0,
        null_label=NULL,
    )
    eps = denoiser(torch.zeros(2, 1, 1, 1, dtype=torch.float64), torch.tensor([5, 5]))
    assert len(seen) == 1 and seen[0] is not None and seen[0].tolist() == [2, 4, NULL, NULL]
    assert eps.dtype == torch.float64
    # eps_u + 3 (eps_c - eps_u) with eps_u = NULL
    assert eps.flatten().tolist() == [NULL + 3 * (2 - NULL), NULL + 3 * (4 - NULL)]


def test_make_eps_denoiser_needs_labels_for_guidance() -> None:
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs class_labels and null_label"):
        make_eps_denoiser(TinyNet(), alpha_bar=ALPHA_BAR, prediction_type="v", guidance_scale=2.0)


def test_sample_validates_inputs() -> None:
    noise = ImageNoise([0])
    x = noise.randn(SHAPE)
    den = make_eps_denoiser(TinyNet(), alpha_bar=ALPHA_BAR, prediction_type="v")
    with pytest.raises(
        ValueError, match="sampler 'euler_a' unknown; choose one of: ddpm, ddim, dpmpp_2m, heun"
    ):
        sample("euler_a", den, x, TIMESTEPS, alpha_bar=ALPHA_BAR, noise=noise)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta=0.5 applies to the 'ddim' sampler only"):
        sample("heun", den, x, TIMESTEPS, alpha_bar=ALPHA_BAR, noise=noise, eta=0.5)
    with pytest.raises(ValueError, match="float64"):
        sample("ddim", den, x.float(), TIMESTEPS, alpha_bar=ALPHA_BAR, noise=noise)
    with pytest.raises(ValueError, match="strictly descending"):
        sample("ddim", den, x, TIMESTEPS.flip(0), alpha_bar=ALPHA_BAR, noise=noise)


class ShrunkEps(torch.nn.Module):
    """An eps-network that under-predicts the noise by 3 %: what an imperfect model does at the
    noisiest steps, where x0 = (x_t - sigma eps) / alpha multiplies the error by 1 / alpha."""

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        return 0.97 * x_t


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_clip_x0_keeps_a_deterministic_sampler_in_the_data_range(name: str) -> None:
    alpha_bar = alpha_bar_from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    timesteps = make_timesteps(1000, 20, "trailing")
    noise = ImageNoise(list(range(8)))
    x_T = noise.randn((1, 8, 8))
    out = {}
    for clip in (None, 1.0):
        denoiser = make_eps_denoiser(
            ShrunkEps(), alpha_bar=alpha_bar, prediction_type="epsilon", clip_x0=clip
        )
        out[clip] = sample(name, denoiser, x_T.clone(), timesteps, alpha_bar=alpha_bar, noise=noise)
    assert out[None].abs().max() > 2.0  # unclipped: far outside the data range
    assert out[1.0].abs().max() <= 1.0 + 1e-6  # clipped: x0 (and so the image) stays in [-1, 1]
