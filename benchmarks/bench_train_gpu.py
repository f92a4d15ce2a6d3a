"""GPU throughput of the DDPM CIFAR-10 network (Ho et al. 2020: 35.7M parameters, 32x32x3):
training img/s and MFU, sampling img/s, and Inception feature-extraction img/s.

Training: one step = our diffusion loss (random timesteps and noise) + backward + fused AdamW +
gradient clipping + EMA, in bf16 autocast, channels_last and `torch.compile` (each can be turned
off). Model FLOPs of one step come from `torch.utils.flop_counter.FlopCounterMode` (forward and
backward of the eager network, the same maths), and MFU = FLOPs per step x steps/s / the device's
peak dense bf16 FLOP/s (`--peak-tflops`, else a table of known devices).

Sampling: DDIM with `--sample-steps` steps (one seed per image, `diffusion_core.samplers`), batch
`--sample-batch`. Extraction: the evaluation's InceptionV3 (seeded stand-in weights: the speed is
the same as the standard weights') on 32x32 uint8 images it resizes to 299x299 itself.

    bash benchmarks/gpu.sh              # runs this with the defaults on cuda
    uv run python -m benchmarks.bench_train_gpu --device cpu --quick   # check the script on CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import n_params, sync, write_results
from diffusion_core.ema import EMA
from diffusion_core.objectives import training_loss
from diffusion_core.perf import autocast, configure_model_for_device
from diffusion_core.samplers import make_eps_denoiser, sample_ddim
from diffusion_core.schedules import alpha_bar_from_betas, linear_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from diffusion_core.unet import UNet, UNetConfig
from tasks.runtime import setup_process

# Ho et al. 2020's CIFAR-10 network: ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at
# 16x16, dropout 0.1, additive time embedding: 35.7M parameters.
DDPM_CIFAR10 = UNetConfig(
    in_channels=3,
    image_size=32,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(16,),
    groups=32,
    dropout=0.1,
    time_conditioning="additive",
)

# Peak dense bf16 tensor-core TFLOP/s (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--warmup", type=int, default=15, help="untimed training steps (compiles)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--sample-batch", type=int, default=512)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--extract-images", type=int, default=4096)
    p.add_argument("--extract-batch", type=int, default=256)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s")
    p.add_argument("--quick", action="store_true", help="few steps and images: a smoke run")
    p.add_argument("--out", default="train_gpu.md", help="file name under benchmarks/results/")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.steps = 2, 3
        args.sample_batch, args.sample_steps = 16, 5
        args.extract_images, args.extract_batch = 32, 16
        args.batch = min(args.batch, 16)
    return args


def peak_tflops(device: str, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "given with --peak-tflops"
    if not device.startswith("cuda"):
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return tflops, f"data sheet of {key}"
    return None, f"unknown device {name!r}: pass --peak-tflops"


def seconds_per_call(fn: Callable[[], object], reps: int, device: str) -> list[float]:
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def extraction_ips(args: argparse.Namespace, device: str) -> float | None:
    """Images/s of the evaluation's InceptionV3 on `args.extract_images` 32x32 images, or None
    where the evaluate stage's dependencies are not installed."""
    try:
        from tasks.config import EvalConfig, StorageConfig
        from tasks.evaluate.inception import extract_features, resolve_extractor
        from tasks.storage import Store
    except ImportError as err:
        print(f"extraction skipped: {err}")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(StorageConfig(root=tmp))
        info = resolve_extractor(
            EvalConfig(on_missing_weights="stand-in"),
            store,
            cache_dir=Path(tmp),
            standard_url="file:///nonexistent",
        )
        images = np.random.default_rng(0).integers(
            0, 256, (args.extract_images, 3, 32, 32), dtype=np.uint8
        )
        extract_features(images[: args.extract_batch], info, args.extract_batch, device)  # warm-up
        sync(device)
        start = time.perf_counter()
        extract_features(images, info, args.extract_batch, device)
        sync(device)
        return args.extract_images / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    setup_process()
    device = args.device
    torch.manual_seed(0)
    module = UNet(DDPM_CIFAR10).to(device)
    params = n_params(module)
    alpha_bar = alpha_bar_from_betas(linear_betas(1000)).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x0 = (torch.rand(args.batch, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=fmt)

    # 1. Model FLOPs of one training step (forward + backward), counted on the eager network.
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, autocast(device, enabled=args.bf16):
        gen = torch.Generator(device=device).manual_seed(0)
        training_loss(module, x0, None, alpha_bar=alpha_bar, generator=gen).backward()
    module.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()

    # 2. Training steps: loss, backward, clipping, fused AdamW, EMA.
    net = configure_model_for_device(
        module, device, channels_last=args.channels_last, compile=args.compile
    ).train()
    opt = torch.optim.AdamW(module.parameters(), lr=2e-4, fused=True)
    ema = EMA(module, decay=0.9999)
    step_count = 0

    def train_step() -> None:
        nonlocal step_count
        gen = torch.Generator(device=device).manual_seed(step_count)
        with autocast(device, enabled=args.bf16):
            loss = training_loss(net, x0, None, alpha_bar=alpha_bar, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        ema.update(module, step_count)
        step_count += 1

    seconds_per_call(train_step, args.warmup, device)
    train_times = seconds_per_call(train_step, args.steps, device)
    step_s = statistics.median(train_times)
    train_ips = args.batch / step_s
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    achieved = flops_per_step / step_s
    mfu = achieved / (peak * 1e12) if peak else None

    # 3. Sampling: DDIM, one seed per image.
    net.eval()
    timesteps = make_timesteps(1000, args.sample_steps, "trailing")
    seeds = list(range(args.sample_batch))

    def sample() -> None:
        noise = ImageNoise(seeds, device)
        denoiser = make_eps_denoiser(net, alpha_bar=alpha_bar, prediction_type="epsilon")
        with torch.inference_mode(), autocast(device, enabled=args.bf16):
            sample_ddim(
                denoiser, noise.randn((3, 32, 32)), timesteps, alpha_bar=alpha_bar, noise=noise
            )

    seconds_per_call(sample, 1, device)
    sample_ips = args.sample_batch / statistics.median(seconds_per_call(sample, 3, device))

    # 4. Inception feature extraction (stand-in weights: same network, same speed): the product's
    # evaluate stage, which needs the project's full environment (pydantic, fsspec, torch-fidelity).
    # Where only torch is installed, the row says so and the rest still runs.
    extract_ips = extraction_ips(args, device)
    extract_text = (
        "n/a: no evaluate stage here" if extract_ips is None else f"{extract_ips:.0f} img/s"
    )

    flags = (
        "+".join(f for f in ("bf16", "channels_last", "compile") if getattr(args, f))
        or "fp32 eager"
    )
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else f"n/a ({peak_source})"
    print(
        f"DDPM CIFAR-10 network ({params / 1e6:.1f}M params, {device}, {flags}): train "
        f"{train_ips:.0f} img/s (batch {args.batch}), {achieved / 1e12:.1f} TFLOP/s, MFU {mfu_text}; "
        f"sampling (DDIM {args.sample_steps}) {sample_ips:.1f} img/s; extraction {extract_text}"
    )
    body = "\n".join(
        [
            f"Network: `{DDPM_CIFAR10.to_dict()}` ({params:,} parameters); {flags}.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| training, batch {args.batch} ({args.warmup} warm-up + {args.steps} timed steps, median) "
            f"| {train_ips:.0f} img/s ({1e3 * step_s:.1f} ms/step) |",
            f"| model FLOPs per step (FlopCounterMode, fwd + bwd) | {flops_per_step / 1e12:.3f} TFLOP |",
            f"| achieved | {achieved / 1e12:.1f} TFLOP/s |",
            f"| MFU (peak {peak if peak else 'n/a'} TFLOP/s bf16: {peak_source}) | {mfu_text} |",
            f"| sampling, DDIM {args.sample_steps} steps, batch {args.sample_batch} | {sample_ips:.1f} img/s |",
            f"| Inception extraction, batch {args.extract_batch}, 32x32 -> 299x299 | {extract_text} |",
        ]
    )
    path = write_results(args.out, "GPU throughput: DDPM CIFAR-10 network", device, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
