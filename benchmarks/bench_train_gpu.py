"""The GPU check: everything one short lease of a GPU machine should measure, in one run of a few
minutes, on the DDPM CIFAR-10 network (Ho et al. 2020: 35.7M parameters, 32x32x3).

1. Training: one step = our diffusion loss (random timesteps and noise) + backward + fused AdamW +
   gradient clipping + EMA, in bf16 autocast, channels_last and `torch.compile` (each can be turned
   off): img/s, and MFU = model FLOPs per step (counted by `torch.utils.flop_counter.FlopCounterMode`
   on the eager network, forward + backward) x steps/s / the device's peak dense bf16 FLOP/s
   (`--peak-tflops`, else a table of known devices).
2. Exact resume: with deterministic kernels, N steps + checkpoint bytes (`diffusion_core.checkpoint`)
   + a fresh process state loaded from them + N steps must equal 2N uninterrupted steps bitwise
   (weights, EMA, AdamW state, losses). Each step's noise and dropout come from its step number, as
   in `tasks/train/loop.py`. Eager (no compile), to keep the lease short.
3. bf16 against fp32 (TF32 off): the same initial weights trained on the same batches, noise and
   dropout masks; the relative difference of the losses, step by step (the first step's is 0 when
   the network's output layer starts at zero).
4. Sampling img/s per NFE (`--sampler`, one seed per image, clip_x0 as the product samples).
5. Inception extraction img/s: the evaluate stage's extractor (stand-in weights: same network, same
   speed), only where its dependencies (pydantic, fsspec, torch-fidelity) are installed.
6. Peak GPU memory of each part.

It imports only torch, numpy and this repository's `diffusion_core` (and, optionally, the evaluate
stage for part 5), so it runs on a bare GPU machine with the machine's own Python:

    bash benchmarks/gpu.sh [--quick]      # picks uv or the machine's python3, checks CUDA first
    python3 -m benchmarks.bench_train_gpu --device cpu --quick --no-compile --network tiny   # check on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks._common import n_params, sync, write_results
from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.ema import EMA
from diffusion_core.objectives import training_loss
from diffusion_core.perf import autocast, configure_model_for_device
from diffusion_core.samplers import SamplerName, make_eps_denoiser, network_evaluations, sample
from diffusion_core.schedules import alpha_bar_from_betas, linear_betas, make_timesteps
from diffusion_core.seeding import ImageNoise
from diffusion_core.unet import UNet, UNetConfig

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
# The same shape of network, small enough to check the script on a CPU in seconds.
TINY = UNetConfig(
    in_channels=3,
    image_size=8,
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    groups=4,
    dropout=0.1,
    time_conditioning="additive",
)
NETWORKS = {"ddpm-cifar10": DDPM_CIFAR10, "tiny": TINY}

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
TARGET_S = 8 * 60  # one short lease measures everything


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--network", choices=sorted(NETWORKS), default="ddpm-cifar10")
    p.add_argument("--batch", type=int, default=128, help="training batch")
    p.add_argument("--warmup", type=int, default=15, help="untimed training steps (compiles)")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--check-batch", type=int, default=32, help="batch of the resume/bf16 checks")
    p.add_argument("--resume-steps", type=int, default=10, help="N of the resume check (N + N)")
    p.add_argument("--precision-steps", type=int, default=20, help="steps of the bf16/fp32 check")
    p.add_argument("--sampler", default="dpmpp_2m", help="ddim, dpmpp_2m, heun, ddpm")
    p.add_argument("--sample-batch", type=int, default=500)
    p.add_argument("--sample-steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--extract-images", type=int, default=4096)
    p.add_argument("--extract-batch", type=int, default=256)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s")
    p.add_argument("--quick", action="store_true", help="few steps and images: a smoke run")
    p.add_argument("--out", default="train_gpu.md", help="file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 2, 3
        args.batch = min(args.batch, 16)
        args.check_batch, args.resume_steps, args.precision_steps = 8, 2, 3
        args.sample_batch, args.sample_steps = 16, [5]
        args.extract_images, args.extract_batch = 32, 16
    return args


def require_device(device: str) -> None:
    """Exit 2 with a clear message where `device` is CUDA and torch sees no GPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"bench_train_gpu needs a CUDA GPU: torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda}) sees none. Run it on a GPU machine (`bash benchmarks/gpu.sh`), "
            "or check the script itself on CPU with `--device cpu --quick --no-compile --network tiny`.",
            file=sys.stderr,
        )
        raise SystemExit(2)


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


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> str:
    if not device.startswith("cuda"):
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


# -- training ------------------------------------------------------------------------------------
@dataclass
class Training:
    """A network, what it is called through (compiled or not), AdamW and the EMA: what a step
    changes and a checkpoint holds."""

    module: UNet
    net: nn.Module
    opt: torch.optim.Optimizer
    ema: EMA

    def step(self, x0: Tensor, step: int, alpha_bar: Tensor, *, bf16: bool) -> Tensor:
        """One step; its noise and dropout masks are functions of `step` (tasks/train/loop.py)."""
        torch.manual_seed(step)  # dropout masks
        gen = torch.Generator(device=x0.device).manual_seed(step)  # timesteps, noise
        with autocast(x0.device, enabled=bf16):
            loss = training_loss(self.net, x0, None, alpha_bar=alpha_bar, generator=gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.ema.update(self.module, step)
        return loss.detach()

    def state(self, step: int) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": step,
            "config": {"bench": "bench_train_gpu"},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])


def build_training(
    cfg: UNetConfig, device: str, *, seed: int, channels_last: bool, compile: bool
) -> Training:
    torch.manual_seed(seed)
    module = UNet(cfg)
    net = configure_model_for_device(module, device, channels_last=channels_last, compile=compile)
    opt = torch.optim.AdamW(module.parameters(), lr=2e-4, fused=device.startswith("cuda"))
    return Training(module, net.train(), opt, EMA(module, decay=0.9999))


def batch_for(step: int, size: int, cfg: UNetConfig, device: str, channels_last: bool) -> Tensor:
    """Step `step`'s images in [-1, 1], a function of the step alone (a stand-in for the data)."""
    gen = torch.Generator(device=device).manual_seed(1_000_000 + step)
    shape = (size, cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = torch.rand(shape, generator=gen, device=device) * 2 - 1
    return x0.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def run_steps(
    tr: Training, steps: range, args: argparse.Namespace, cfg: UNetConfig, alpha_bar: Tensor
) -> list[float]:
    losses = [
        tr.step(
            batch_for(s, args.check_batch, cfg, args.device, args.channels_last),
            s,
            alpha_bar,
            bf16=args.bf16,
        )
        for s in steps
    ]
    return torch.stack(losses).float().tolist() if losses else []


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic algorithms (cuDNN, cuBLAS with CUBLAS_WORKSPACE_CONFIG set in `main`); an op
    without one raises instead of silently breaking the comparison."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 as fp32: TF32 tensor cores off for matmuls and convolutions."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(state, Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key in sorted(state, key=str):
            yield from _tensors(state[key], f"{prefix}.{key}")
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            yield from _tensors(value, f"{prefix}[{i}]")


def state_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the tensors (model, EMA, AdamW) that are not bitwise equal."""
    ta, tb = dict(_tensors(a)), dict(_tensors(b))
    if ta.keys() != tb.keys():
        return sorted(ta.keys() ^ tb.keys())
    return [k for k in ta if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]


def exact_resume(args: argparse.Namespace, cfg: UNetConfig, alpha_bar: Tensor) -> dict[str, Any]:
    """N + checkpoint + resume + N steps against 2N uninterrupted steps, bitwise."""
    n, dev = args.resume_steps, args.device
    build = dict(channels_last=args.channels_last, compile=False)
    with deterministic_kernels():
        whole = build_training(cfg, dev, seed=0, **build)
        whole_losses = run_steps(whole, range(2 * n), args, cfg, alpha_bar)
        first = build_training(cfg, dev, seed=0, **build)
        run_steps(first, range(n), args, cfg, alpha_bar)
        data = save_checkpoint(first.state(n))
        del first
        resumed = build_training(cfg, dev, seed=1, **build)  # other weights: the load must win
        resumed.load(load_checkpoint(data, map_location=dev))
        resumed_losses = run_steps(resumed, range(n, 2 * n), args, cfg, alpha_bar)
        differing = state_differences(whole.state(2 * n), resumed.state(2 * n))
        result: dict[str, Any] = {
            "steps": n,
            "checkpoint_mb": len(data) / 1e6,
            "equal": not differing and whole_losses[n:] == resumed_losses,
            "differing": differing,
            "losses_equal": whole_losses[n:] == resumed_losses,
        }
        if not result["equal"]:  # a resume bug, or kernels that differ run to run?
            again = build_training(cfg, dev, seed=0, **build)
            run_steps(again, range(2 * n), args, cfg, alpha_bar)
            result["repeatable"] = not state_differences(whole.state(2 * n), again.state(2 * n))
    return result


def bf16_vs_fp32(args: argparse.Namespace, cfg: UNetConfig, alpha_bar: Tensor) -> dict[str, float]:
    """Losses of bf16 and fp32 training from the same weights on the same batches and noise."""
    steps = range(args.precision_steps)
    losses = {}
    with deterministic_kernels(), no_tf32():
        for bf16 in (False, True):
            tr = build_training(
                cfg, args.device, seed=0, channels_last=args.channels_last, compile=False
            )
            losses[bf16] = run_steps(
                tr, steps, argparse.Namespace(**{**vars(args), "bf16": bf16}), cfg, alpha_bar
            )
    rel = [abs(b - f) / f for f, b in zip(losses[False], losses[True], strict=True)]
    return {
        "mean": statistics.fmean(rel),
        "max": max(rel),
        "fp32_last": losses[False][-1],
        "bf16_last": losses[True][-1],
    }


# -- sampling and extraction ---------------------------------------------------------------------
def sampling_rates(
    net: nn.Module, cfg: UNetConfig, alpha_bar: Tensor, args: argparse.Namespace
) -> list[tuple[int, int, float]]:
    """(steps, NFE per image, img/s) of `args.sampler` at each of `args.sample_steps`."""
    name: SamplerName = args.sampler
    seeds = list(range(args.sample_batch))
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    denoiser = make_eps_denoiser(net, alpha_bar=alpha_bar, prediction_type="epsilon", clip_x0=1.0)
    rows = []
    for steps in args.sample_steps:
        timesteps = make_timesteps(1000, steps, "trailing")

        def run(timesteps: Tensor = timesteps) -> None:
            noise = ImageNoise(seeds, args.device)
            with torch.inference_mode(), autocast(args.device, enabled=args.bf16):
                sample(
                    name, denoiser, noise.randn(shape), timesteps, alpha_bar=alpha_bar, noise=noise
                )

        seconds_per_call(run, 1, args.device)  # compiles on the first NFE
        seconds = statistics.median(seconds_per_call(run, 2, args.device))
        rows.append((steps, network_evaluations(name, steps), args.sample_batch / seconds))
    return rows


def extraction_ips(args: argparse.Namespace) -> tuple[float | None, str]:
    """Images/s of the evaluation's InceptionV3 on 32x32 images, or None and why not: the
    extractor belongs to the evaluate stage, which needs the project's full environment."""
    try:
        from tasks.config import EvalConfig, StorageConfig
        from tasks.evaluate.inception import extract_features, resolve_extractor
        from tasks.storage import Store
    except ImportError as err:
        return None, f"skipped: the evaluate stage's dependencies are not installed ({err})"
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
        extract_features(images[: args.extract_batch], info, args.extract_batch, args.device)
        sync(args.device)
        start = time.perf_counter()
        extract_features(images, info, args.extract_batch, args.device)
        sync(args.device)
        ips = args.extract_images / (time.perf_counter() - start)
    return ips, f"{ips:.0f} img/s"


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Throughput:
    params: int
    flops_per_step: float
    step_s: float
    rates: list[tuple[int, int, float]]  # sampling: (steps, NFE, img/s)
    peaks: dict[str, str]


def measure_throughput(args: argparse.Namespace, cfg: UNetConfig, alpha_bar: Tensor) -> Throughput:
    """Model FLOPs of one training step (counted on the eager network), the timed training steps
    and then sampling on the network as trained (compiled, channels_last)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = args.device
    reset_peak(device)
    tr = build_training(cfg, device, seed=0, channels_last=args.channels_last, compile=args.compile)
    x0 = batch_for(0, args.batch, cfg, device, args.channels_last)
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, enabled=args.bf16):
        gen = torch.Generator(device=device).manual_seed(0)
        training_loss(tr.module, x0, None, alpha_bar=alpha_bar, generator=gen).backward()
    tr.module.zero_grad(set_to_none=True)
    steps = iter(range(args.warmup + args.steps))

    def train_step() -> None:
        tr.step(x0, next(steps), alpha_bar, bf16=args.bf16)

    seconds_per_call(train_step, args.warmup, device)
    step_s = statistics.median(seconds_per_call(train_step, args.steps, device))
    peaks = {"training": peak_gib(device)}
    reset_peak(device)
    tr.net.eval()
    rates = sampling_rates(tr.net, cfg, alpha_bar, args)
    peaks["sampling"] = peak_gib(device)
    return Throughput(n_params(tr.module), counter.get_total_flops(), step_s, rates, peaks)


def resume_summary(args: argparse.Namespace, cfg: UNetConfig, alpha_bar: Tensor) -> str:
    try:
        resume = exact_resume(args, cfg, alpha_bar)
    except RuntimeError as err:  # an op without a deterministic kernel names itself here
        return f"could not run with deterministic kernels: {str(err).splitlines()[0]}"
    text = (
        f"bitwise equal (weights, EMA, AdamW, {resume['steps']} losses)"
        if resume["equal"]
        else f"DIFFERENT: {len(resume['differing'])} tensors differ "
        f"(e.g. {resume['differing'][:3]}), losses equal: {resume['losses_equal']}; "
        f"uninterrupted runs repeat bitwise: {resume.get('repeatable')}"
    )
    return text + f"; checkpoint {resume['checkpoint_mb']:.1f} MB"


def precision_summary(args: argparse.Namespace, cfg: UNetConfig, alpha_bar: Tensor) -> str:
    try:
        p = bf16_vs_fp32(args, cfg, alpha_bar)
    except RuntimeError as err:
        return f"could not run with deterministic kernels: {str(err).splitlines()[0]}"
    return (
        f"mean {p['mean']:.1e}, max {p['max']:.1e}; "
        f"last loss fp32 {p['fp32_last']:.5f}, bf16 {p['bf16_last']:.5f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_device(args.device)
    # cuBLAS reads this when it starts: set before any CUDA work, for the deterministic checks.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device, cfg = args.device, NETWORKS[args.network]
    alpha_bar = alpha_bar_from_betas(linear_betas(1000)).to(device)
    took: dict[str, float] = {}
    began = t0 = time.perf_counter()

    # 1, 4. Training and sampling throughput (compiled).
    th = measure_throughput(args, cfg, alpha_bar)
    took["training + sampling"], t0 = time.perf_counter() - t0, time.perf_counter()
    # 2, 3. Exact resume and bf16 vs fp32 (eager, deterministic kernels).
    reset_peak(device)
    resume_text = resume_summary(args, cfg, alpha_bar)
    precision_text = precision_summary(args, cfg, alpha_bar)
    th.peaks["resume and bf16 checks"] = peak_gib(device)
    took["checks"], t0 = time.perf_counter() - t0, time.perf_counter()
    # 5. Inception feature extraction (stand-in weights).
    reset_peak(device)
    _, extract_text = extraction_ips(args)
    th.peaks["extraction"] = peak_gib(device)
    took["extraction"] = time.perf_counter() - t0
    total = time.perf_counter() - began

    train_ips = args.batch / th.step_s
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    achieved = th.flops_per_step / th.step_s
    mfu_text = f"{100 * achieved / (peak * 1e12):.1f}%" if peak else f"n/a ({peak_source})"
    flags = (
        "+".join(f for f in ("bf16", "channels_last", "compile") if getattr(args, f))
        or "fp32 eager"
    )
    env = os.environ.get("DIFFPIPE_GPU_ENV", f"python {sys.executable}")
    print(
        f"{args.network} network ({th.params / 1e6:.1f}M params, {device}, {flags}): train "
        f"{train_ips:.1f} img/s (batch {args.batch}), {achieved / 1e12:.3f} TFLOP/s, MFU {mfu_text}; "
        f"resume: {resume_text}; bf16 vs fp32 loss: {precision_text}; "
        + "; ".join(f"{args.sampler} NFE {nfe}: {ips:.1f} img/s" for _, nfe, ips in th.rates)
        + f"; extraction {extract_text}; {total:.0f} s in all"
    )
    rows = [
        f"| training, batch {args.batch} ({args.warmup} warm-up + {args.steps} timed steps, median) "
        f"| {train_ips:.1f} img/s ({1e3 * th.step_s:.1f} ms/step) |",
        f"| model FLOPs per step (FlopCounterMode, fwd + bwd) | {th.flops_per_step / 1e12:.4f} TFLOP |",
        f"| achieved | {achieved / 1e12:.3f} TFLOP/s |",
        f"| MFU (peak {peak if peak else 'n/a'} TFLOP/s bf16: {peak_source}) | {mfu_text} |",
        f"| exact resume, {args.resume_steps} + {args.resume_steps} steps vs "
        f"{2 * args.resume_steps}, batch {args.check_batch}, deterministic kernels | {resume_text} |",
        f"| bf16 vs fp32 (TF32 off) loss, {args.precision_steps} steps, same batches and noise, "
        f"relative difference | {precision_text} |",
        *(
            f"| sampling, {args.sampler} {steps} steps = {nfe} NFE, batch {args.sample_batch} "
            f"| {ips:.1f} img/s ({ips * nfe:.0f} network evaluations of one image/s) |"
            for steps, nfe, ips in th.rates
        ),
        f"| Inception extraction, batch {args.extract_batch}, 32x32 -> 299x299 | {extract_text} |",
        *(f"| peak GPU memory allocated, {part} | {value} |" for part, value in th.peaks.items()),
        "| wall time: "
        + ", ".join(f"{part} {s:.0f} s" for part, s in took.items())
        + f" | {total:.0f} s (target < {TARGET_S} s) |",
    ]
    body = "\n".join(
        [
            f"Network `{args.network}`: `{cfg.to_dict()}` ({th.params:,} parameters); {flags}; "
            f"environment: {env}.",
            "",
            "| measure | value |",
            "|---|---|",
            *rows,
        ]
    )
    title = f"GPU check: {args.network} network"
    print(f"wrote {write_results(args.out, title, device, body)}")


if __name__ == "__main__":
    main()
