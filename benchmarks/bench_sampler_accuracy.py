"""Sampler accuracy per NFE on a closed-form distribution, relative to a reference in the same run.

Data: the 4-dim Gaussian N(MU, SIGMA) of tests/support/gaussian_oracle.py (eigenvalues 0.010 to
1.93), denoised by its exact eps-denoiser, sampling started from the exact marginal at the first
timestep: the only error left is each sampler's discretisation. Two errors:
- W2: the 2-Wasserstein (Frechet) distance between the output distribution and the data;
- max std error: max over the 4 dimensions of |std of the output - std of the data|.
Deterministic samplers' output moments are exact (affine probing, no Monte Carlo noise); DDPM's
are Monte Carlo over --ddpm-samples images (noise floor ~ 1.5 / sqrt(N) in W2). NFE = steps,
except Heun: 2 * steps - 1.

Two tables per schedule:
- every sampler at one spacing (--spacing), W2 relative to DDIM (eta = 0) at the same NFE;
- every timestep spacing for the deterministic samplers, relative to "trailing" at the same NFE.

    uv run python -m benchmarks.bench_sampler_accuracy
    uv run python -m benchmarks.bench_sampler_accuracy --spacing logsnr
"""

from __future__ import annotations

import argparse
import time
from typing import get_args

from torch import Tensor

from benchmarks._common import write_results
from diffusion_core.samplers import SAMPLERS
from diffusion_core.schedules import (
    ScheduleKind,
    Spacing,
    alpha_bar_from_betas,
    make_betas,
    make_timesteps,
)
from diffusion_core.seeding import ImageNoise
from tasks.runtime import setup_process
from tests.support.gaussian_oracle import (
    exact_moments,
    moments,
    monte_carlo,
    std_error,
    w2_distance,
)

NUM_TIMESTEPS = 1000
NFES = (5, 10, 20, 50, 100, 200)
REFERENCE = "ddim"
REFERENCE_SPACING: Spacing = "trailing"
DETERMINISTIC = ("ddim", "dpmpp_2m", "heun")


def steps_for(name: str, nfe: int) -> int:
    """Timesteps giving (about) ``nfe`` network evaluations; Heun uses 2 n - 1."""
    return (nfe + 1) // 2 if name == "heun" else nfe


def nfe_of(name: str, steps: int) -> int:
    return 2 * steps - 1 if name == "heun" else steps


def output_moments(
    name: str, steps: int, kind: ScheduleKind, spacing: Spacing, ddpm_samples: int
) -> tuple[Tensor, Tensor]:
    """Mean [4] and covariance [4, 4] of the sampler's output: exact, or Monte Carlo for DDPM."""
    alpha_bar = alpha_bar_from_betas(make_betas(kind, NUM_TIMESTEPS))
    timesteps = make_timesteps(NUM_TIMESTEPS, steps, spacing, alpha_bar=alpha_bar)
    if name != "ddpm":
        return exact_moments(SAMPLERS[name], timesteps, alpha_bar)
    return moments(
        monte_carlo(SAMPLERS["ddpm"], timesteps, alpha_bar, ImageNoise(range(ddpm_samples)))
    )


def sampler_table(kind: ScheduleKind, spacing: Spacing, ddpm_samples: int) -> str:
    names = list(SAMPLERS)
    head = "| NFE | " + " | ".join(f"{n} W2 (x {REFERENCE})" for n in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for nfe in NFES:
        cells = []
        for name in names:
            steps = steps_for(name, nfe)
            actual = nfe_of(name, steps)
            err = w2_distance(*output_moments(name, steps, kind, spacing, ddpm_samples))
            ref = w2_distance(*output_moments(REFERENCE, actual, kind, spacing, ddpm_samples))
            tag = f" [{actual}]" if actual != nfe else ""
            cells.append(f"{err:.2e} (x{err / ref:.2f}){tag}")
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spacing_table(kind: ScheduleKind) -> str:
    spacings: tuple[Spacing, ...] = get_args(Spacing)
    head = "| sampler | NFE | " + " | ".join(spacings) + " |"
    lines = [head, "|" + "---|" * (len(spacings) + 2)]
    for name in DETERMINISTIC:
        for nfe in NFES:
            steps = steps_for(name, nfe)
            errors = {}
            for spacing in spacings:
                mean, cov = output_moments(name, steps, kind, spacing, ddpm_samples=0)
                errors[spacing] = (std_error(cov), w2_distance(mean, cov))
            ref_std, ref_w2 = errors[REFERENCE_SPACING]
            cells = [
                f"{std:.2e} (x{std / ref_std:.2f}) / {w2:.2e} (x{w2 / ref_w2:.2f})"
                for std, w2 in errors.values()
            ]
            lines.append(f"| {name} | {nfe_of(name, steps)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--spacing", default="trailing", choices=get_args(Spacing))
    p.add_argument("--ddpm-samples", type=int, default=4000)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    setup_process()

    start = time.perf_counter()
    sections = []
    kinds: tuple[ScheduleKind, ...] = ("linear", "cosine")
    for kind in kinds:
        body = sampler_table(kind, args.spacing, args.ddpm_samples)
        section = f"## {kind} schedule, T = {NUM_TIMESTEPS}, {args.spacing} spacing\n\n{body}"
        print(section + "\n")
        sections.append(section)
    for kind in kinds:
        body = spacing_table(kind)
        section = (
            f"## {kind} schedule, T = {NUM_TIMESTEPS}: timestep spacings, max std error / W2\n\n"
            f"{body}"
        )
        print(section + "\n")
        sections.append(section)
    notes = (
        "W2: 2-Wasserstein distance to the data N(MU, SIGMA); max std error: max over the "
        "dimensions of |std of the output - std of the data| (both lower is better). In brackets, "
        f"the ratio to {REFERENCE.upper()} (eta = 0) at the same NFE and spacing (sampler "
        f"tables), or to {REFERENCE_SPACING!r} spacing with the same sampler and NFE (spacing "
        "tables), measured in this run; [n]: the NFE actually used when it differs (Heun: "
        f"2 steps - 1). DDPM: Monte Carlo over {args.ddpm_samples} images, noise floor "
        f"~{1.5 / args.ddpm_samples**0.5:.0e}; the others exact. Took "
        f"{time.perf_counter() - start:.0f} s."
    )
    print(notes)
    path = write_results(
        "sampler_accuracy.md",
        "Sampler accuracy per NFE on a closed-form Gaussian",
        "cpu",
        "\n\n".join(sections) + "\n\n" + notes,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
