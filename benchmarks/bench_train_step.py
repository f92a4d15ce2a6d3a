"""Training-step throughput of our UNet vs diffusers' UNet2DModel of the same architecture.

One step = forward on noisy images + eps-MSE loss + backward + AdamW step. Both networks get the
same config (levels, blocks, attention placement, GroupNorm groups, time-embedding width), the
same batch and the same optimizer; repetitions alternate between them (ABBA order) after a
warm-up so that machine noise hits both alike. Reports median images/s and the ratio.

    uv run python -m benchmarks.bench_train_step                  # CPU, small defaults
    uv run python -m benchmarks.bench_train_step --device cuda --bf16 --channels-last --compile
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks._common import diffusers_unet, n_params, time_interleaved, write_results
from diffusion_core.perf import autocast, configure_model_for_device
from diffusion_core.unet import UNet, UNetConfig
from tasks.runtime import setup_process


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2])
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--attention-resolutions", type=int, nargs="*", default=[8])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--reps", type=int, default=12, help="timed steps per model")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    p.add_argument("--channels-last", action="store_true", help="channels_last for both")
    p.add_argument("--compile", action="store_true", help="torch.compile both")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default="train_step.md", help="file name under benchmarks/results/")
    return p.parse_args()


def make_step(
    net: nn.Module, batch: tuple[Tensor, Tensor, Tensor], args: argparse.Namespace, is_ref: bool
) -> Callable[[], None]:
    """One eps-prediction training step on a fixed batch (same data for both networks)."""
    x_t, t, eps = batch
    # fused AdamW (CPU and CUDA) for both: the optimizer is common work, not what we compare.
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

    def step() -> None:
        with autocast(args.device, enabled=args.bf16):
            pred = net(x_t, t).sample if is_ref else net(x_t, t)
            loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    args = parse_args()
    setup_process()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = UNetConfig(
        in_channels=args.in_channels,
        image_size=args.image_size,
        base_channels=args.base_channels,
        channel_mult=tuple(args.channel_mult),
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=tuple(args.attention_resolutions),
        groups=args.groups,
    )
    torch.manual_seed(0)
    ours_module, ref_module = UNet(cfg), diffusers_unet(cfg)
    params = {"ours": n_params(ours_module), "diffusers": n_params(ref_module)}
    if abs(params["ours"] / params["diffusers"] - 1) > 0.05:
        raise SystemExit(f"parameter counts differ by more than 5%: {params}")
    nets = {
        name: configure_model_for_device(
            m, args.device, channels_last=args.channels_last, compile=args.compile
        ).train()
        for name, m in (("ours", ours_module), ("diffusers", ref_module))
    }

    # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps on DDPM's linear schedule, built once.
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    eps = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = (
        x_t.to(args.device).contiguous(memory_format=fmt),
        t.to(args.device),
        eps.to(args.device),
    )
    steps = {name: make_step(net, batch, args, name == "diffusers") for name, net in nets.items()}

    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = time_interleaved(steps, reps=args.reps, device=args.device)

    ips = {name: args.batch / statistics.median(ts) for name, ts in times.items()}
    ratio = ips["ours"] / ips["diffusers"]
    flags = [f for f in ("bf16", "channels_last", "compile") if getattr(args, f)]
    setting = f"{args.device}, batch {args.batch}, {'+'.join(flags) or 'fp32 eager'}"
    summary = (
        f"train step ({setting}): ours {ips['ours']:.1f} img/s, diffusers UNet2DModel "
        f"{ips['diffusers']:.1f} img/s, ratio ours/diffusers = {ratio:.3f}"
    )
    print(summary)
    body = "\n".join(
        [
            f"Setting: {setting}; {args.warmup} warm-up + {args.reps} timed steps each, "
            "interleaved (ABBA); median step time.",
            f"Config: `{cfg.to_dict()}`",
            "",
            "| network | parameters | images/s (median) | step ms (median) | step ms (min) |",
            "|---|---|---|---|---|",
            *(
                f"| {'diffusion_core UNet' if n == 'ours' else 'diffusers UNet2DModel'} "
                f"| {params[n]:,} | {ips[n]:.1f} | {1e3 * statistics.median(times[n]):.1f} "
                f"| {1e3 * min(times[n]):.1f} |"
                for n in ("ours", "diffusers")
            ),
            "",
            f"**Ratio ours/diffusers: {ratio:.3f}**",
        ]
    )
    path = write_results(args.out, "Training-step throughput", args.device, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
