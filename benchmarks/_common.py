"""Shared helpers for the benchmarks: the matching diffusers reference, the benchmark config's
sections, timing and result files.

A benchmark runs as a module from the repository root, `uv run python -m benchmarks.bench_x`, and
its `main` calls `tasks.runtime.setup_process()` first, as the CLI does. This module imports torch
and `diffusion_core` only (no Ray, Prefect or pydantic): the GPU benchmarks run where only those
are installed.
"""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_core.unet import UNetConfig
from tests.support.paths import SHARED_DATA

RESULTS_DIR = Path(__file__).parent / "results"


def mnist_settings(images: int) -> dict[str, dict[str, Any]]:
    """The data and model sections of the training benchmarks' "benchmark config" (RESULTS.md):
    the first `images` of MNIST's test set at 28x28 from the shared test data, a UNet of 1.19 M
    parameters (base 32, levels 1-2-2, attention at 7x7)."""
    return {
        "data": {
            "dataset": "mnist",
            "root": str(SHARED_DATA / "mnist"),
            "source_split": "test",
            "max_images": images,
        },
        "model": {"base_channels": 32, "channel_mult": [1, 2, 2], "attention_resolutions": [7]},
    }


def diffusers_unet(cfg: UNetConfig) -> nn.Module:
    """diffusers' UNet2DModel with the same levels, blocks, attention, norms and embedding."""
    from diffusers import UNet2DModel

    sizes = cfg.level_sizes
    attn = [s in cfg.attention_resolutions for s in sizes]
    widths = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=widths,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=cfg.num_res_blocks,
        # None = one head per block; otherwise a fixed head width, which only matches num_heads
        # when all attention levels have the same width.
        attention_head_dim=None if cfg.num_heads == 1 else widths[-1] // cfg.num_heads,
        norm_num_groups=cfg.groups,
        attn_norm_num_groups=cfg.groups,
        resnet_time_scale_shift="scale_shift"
        if cfg.time_conditioning == "scale_shift"
        else "default",
        dropout=cfg.dropout,
        num_class_embeds=None if cfg.num_classes is None else cfg.num_classes + 1,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def machine_description(device: str) -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"CPU: {cpu} ({torch.get_num_threads()} torch threads)", f"torch {torch.__version__}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    try:
        import diffusers

        parts.append(f"diffusers {diffusers.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def command_line() -> str:
    """How this benchmark was started, as a user types it: `uv run python -m benchmarks.bench_x
    ARGS`."""
    spec = sys.modules["__main__"].__spec__
    program = f"-m {spec.name}" if spec is not None else shlex.quote(sys.argv[0])
    return " ".join(["uv run python", program, *(shlex.quote(a) for a in sys.argv[1:])])


def write_results(name: str, title: str, device: str, body: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    command = command_line()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"# {title}\n\n- Date: {now}\n- Machine: {machine_description(device)}\n"
        f"- Command: `{command}`\n\n{body}\n"
    )
    path.write_text(text)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    runs: dict[str, Callable[[], object]], *, reps: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of each run, alternating their order every repetition (ABBA), so that
    machine noise (other processes, clocks) hits every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times
