"""Sampling throughput at fixed NFE: our DDIM pipeline vs a diffusers DDIMScheduler loop.

Both drive the SAME network (our UNet, eval mode, no grad) from the same initial noise:
- ours: `samplers.sample_ddim(make_eps_denoiser(net, ...), x, make_timesteps(...), ...)`, step
  maths in float64, the network in float32 (casts at the model boundary);
- reference: `scheduler.set_timesteps(n); for t in scheduler.timesteps:
  x = scheduler.step(net(x, t), t, x).prev_sample`, in float32.
Repetitions alternate (ABBA) after a warm-up; reports median images/s, the ratio, and the max
difference between the two pipelines' samples as a correctness check.

    uv run python -m benchmarks.bench_sampling
    uv run python -m benchmarks.bench_sampling --device cuda --bf16 --channels-last --compile
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks._common import n_params, time_interleaved, write_results
from diffusion_core.perf import autocast, configure_model_for_device
from diffusion_core.samplers import make_eps_denoiser, sample_ddim
from diffusion_core.schedules import alpha_bar_from_betas, linear_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from diffusion_core.unet import UNet, UNetConfig
from tasks.runtime import setup_process

NUM_TIMESTEPS = 1000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (= network evaluations)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="untimed sampling runs per pipeline")
    p.add_argument("--reps", type=int, default=4, help="timed sampling runs per pipeline")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the network (both)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default="sampling.md", help="file name under benchmarks/results/")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    setup_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler

    cfg = UNetConfig(image_size=args.image_size, base_channels=args.base_channels)
    torch.manual_seed(0)
    module = UNet(cfg)
    # The output conv starts at zero; give it weights so the samples are not trivially equal.
    nn.init.normal_(module.conv_out.weight, std=0.02)
    params = n_params(module)
    net = configure_model_for_device(
        module, args.device, channels_last=args.channels_last, compile=args.compile
    ).eval()

    betas = linear_betas(NUM_TIMESTEPS)
    alpha_bar = alpha_bar_from_betas(betas)
    timesteps = make_timesteps(NUM_TIMESTEPS, args.steps, "leading")
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    seeds = list(range(args.batch))
    x_T = ImageNoise(seeds, args.device).randn(shape)  # float64 [B, C, H, W]

    def ours() -> Tensor:
        denoiser = make_eps_denoiser(net, alpha_bar=alpha_bar, prediction_type="epsilon")
        noise = ImageNoise(seeds, args.device)
        with autocast(args.device, enabled=args.bf16):
            return sample_ddim(denoiser, x_T, timesteps, alpha_bar=alpha_bar, noise=noise)

    scheduler = DDIMScheduler(
        num_train_timesteps=NUM_TIMESTEPS,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
        steps_offset=0,
    )

    def reference() -> Tensor:
        scheduler.set_timesteps(args.steps, device=args.device)
        x = x_T.to(torch.float32)
        with torch.no_grad(), autocast(args.device, enabled=args.bf16):
            for t in scheduler.timesteps:
                eps = net(x, t.expand(x.shape[0]))
                x = scheduler.step(eps.float(), t, x).prev_sample
        return x

    runs: dict[str, Callable[[], Tensor]] = {"ours": ours, "diffusers": reference}
    outputs = {name: run() for name, run in runs.items()}
    for _ in range(args.warmup - 1):
        for run in runs.values():
            run()
    max_diff = (outputs["ours"].float() - outputs["diffusers"]).abs().max().item()
    if not torch.equal(scheduler.timesteps.cpu(), timesteps):
        raise SystemExit(f"timesteps differ: {scheduler.timesteps} vs {timesteps}")

    times = time_interleaved(runs, reps=args.reps, device=args.device)

    ips = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
    ratio = ips["ours"] / ips["diffusers"]
    flags = [f for f in ("bf16", "channels_last", "compile") if getattr(args, f)]
    setting = (
        f"{args.device}, batch {args.batch}, {args.steps} DDIM steps, "
        f"{'+'.join(flags) or 'fp32 eager'}"
    )
    summary = (
        f"sampling ({setting}): ours {ips['ours']:.1f} img/s, diffusers DDIMScheduler loop "
        f"{ips['diffusers']:.1f} img/s, ratio ours/diffusers = {ratio:.3f} "
        f"(max |x0 diff| = {max_diff:.2e})"
    )
    print(summary)
    names = {"ours": "sample_ddim + make_eps_denoiser", "diffusers": "diffusers DDIMScheduler loop"}
    body = "\n".join(
        [
            f"Setting: {setting}; network: diffusion_core UNet ({params:,} parameters), the same "
            f"module in both pipelines; {args.warmup} warm-up + {args.reps} timed runs each, "
            "interleaved (ABBA); median run time.",
            f"Config: `{cfg.to_dict()}`",
            "",
            "| pipeline | images/s (median) | run s (median) | run s (min) |",
            "|---|---|---|---|",
            *(
                f"| {names[n]} | {ips[n]:.1f} | {statistics.median(times[n]):.3f} "
                f"| {min(times[n]):.3f} |"
                for n in runs
            ),
            "",
            f"**Ratio ours/diffusers: {ratio:.3f}**; max |difference| of the samples: "
            f"{max_diff:.2e}",
        ]
    )
    path = write_results(args.out, "Sampling throughput at fixed NFE", args.device, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
