"""What only a GPU can show: training resumes bitwise with deterministic kernels, bf16 training
follows fp32, and an image depends on its seed alone, on CUDA. A tiny network keeps each test to
seconds; `benchmarks/bench_train_gpu.py` measures the same on the CIFAR-10 network."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_train_gpu import TINY, bf16_vs_fp32, exact_resume, no_tf32, parse_args
from diffusion_core.samplers import make_eps_denoiser, sample
from diffusion_core.schedules import alpha_bar_from_betas, linear_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from diffusion_core.unet import UNet

pytestmark = pytest.mark.gpu  # and skipped without CUDA (conftest.py)
ARGS = ["--device", "cuda", "--network", "tiny", "--no-compile"]


def alpha_bar() -> torch.Tensor:
    return alpha_bar_from_betas(linear_betas(1000)).to("cuda")


def test_training_resumes_bitwise_on_gpu() -> None:
    args = parse_args([*ARGS, "--resume-steps", "4", "--check-batch", "16"])
    result = exact_resume(args, TINY, alpha_bar())
    assert result["equal"], result


def test_bf16_training_follows_fp32() -> None:
    args = parse_args([*ARGS, "--precision-steps", "10", "--check-batch", "16"])
    diff = bf16_vs_fp32(args, TINY, alpha_bar())
    assert diff["max"] < 0.02, diff  # relative, per step; bf16 keeps ~3 significant digits


def test_an_image_depends_on_its_seed_alone_on_gpu() -> None:
    torch.manual_seed(0)
    net = UNet(TINY).to("cuda").eval()
    ab = alpha_bar()
    denoiser = make_eps_denoiser(net, alpha_bar=ab, prediction_type="epsilon", clip_x0=1.0)
    shape = (TINY.in_channels, TINY.image_size, TINY.image_size)
    timesteps = make_timesteps(1000, 10, "trailing")

    def images(seeds: list[int]) -> torch.Tensor:
        noise = ImageNoise(seeds, "cuda")
        with torch.inference_mode(), no_tf32():
            return sample(
                "dpmpp_2m", denoiser, noise.randn(shape), timesteps, alpha_bar=ab, noise=noise
            )

    alone, in_batch = images([7, 8]), images([3, 7, 8, 11, 12, 13, 14, 15])[1:3]
    # Kernels may differ with the batch size (float32 sums in another order), never the maths.
    assert (alone - in_batch).abs().max().item() < 1e-3
