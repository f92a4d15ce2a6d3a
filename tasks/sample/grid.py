"""The sampler sweep's settings (pure: no store, no Ray): which sample settings a sweep varies, their
validation, their cost in network evaluations, and the choice of the cheapest setting within the
noise of the best.

A sweep scores every setting on the same seed ranges (the same `sample.seed_start`, `num_images`
and `evaluate.repeats`), so two settings are compared range by range with the paired test of
`tasks.compare`, and the cost of a setting is its network evaluations per image (NFE).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from itertools import product
from typing import Any

from pydantic import ValidationError

from diffusion_core.samplers import network_evaluations
from tasks.compare import Candidate, choose
from tasks.config import SampleConfig
from tasks.records import MetricName, Metrics, SamplerChoice, SampleSet, ScoredSetting

# What a sweep varies: how the images are made from the loaded weights. Everything else (weights,
# seeds, image count, batch and pool settings) is shared by the whole job.
GRID_FIELDS = ("sampler", "steps", "spacing", "guidance_scale", "eta")


def check_same_job(configs: Sequence[SampleConfig]) -> None:
    """Settings sampled as one job differ only in `GRID_FIELDS` (one weights load per actor, and
    the same seed ranges for every setting)."""
    first = configs[0]
    for cfg in configs[1:]:
        for field in SampleConfig.model_fields:
            a, b = getattr(first, field), getattr(cfg, field)
            if field not in GRID_FIELDS and a != b:
                raise ValueError(
                    f"the settings of one sampling job may differ only in "
                    f"{', '.join(GRID_FIELDS)}; sample.{field} differs ({a!r} vs {b!r})"
                )


def describe_setting(cfg: SampleConfig) -> str:
    """'dpmpp_2m, 20 steps, logsnr' (and guidance or eta when they are set)."""
    text = f"{cfg.sampler}, {cfg.steps} steps, {cfg.spacing}"
    if cfg.guidance_scale != 1.0:
        text += f", guidance {cfg.guidance_scale:g}"
    if cfg.eta != 0.0:
        text += f", eta {cfg.eta:g}"
    return text


def setting_overrides(cfg: SampleConfig) -> list[str]:
    """The `section.field=value` overrides that select `cfg`'s setting."""
    return [f"sample.{field}={getattr(cfg, field)}" for field in GRID_FIELDS]


def product_grid(
    samplers: Sequence[str],
    steps: Sequence[int],
    spacings: Sequence[str],
    guidance: Sequence[float],
) -> list[dict[str, Any]]:
    """Every combination, as the sample fields each sets (an empty list leaves that field as
    configured)."""
    axes: list[list[tuple[str, Any]]] = [
        [(field, v) for v in values]
        for field, values in (
            ("sampler", samplers),
            ("steps", steps),
            ("spacing", spacings),
            ("guidance_scale", guidance),
        )
        if values
    ]
    return [dict(combo) for combo in product(*axes)]


def grid_configs(
    base: SampleConfig,
    grid: Sequence[Mapping[str, Any]],
    *,
    num_timesteps: int | None = None,
    conditional: bool | None = None,
) -> list[SampleConfig]:
    """`base` with each entry of `grid` (sample fields) over it, checked, and checked against the
    model (its training timesteps and whether it is class-conditional) where those are given: a
    ValueError names the bad value and what would fix it."""
    if not grid:
        raise ValueError("the sampler grid is empty: give at least one setting")
    configs: list[SampleConfig] = []
    for entry in grid:
        unknown = sorted(set(entry) - set(GRID_FIELDS))
        if unknown:
            raise ValueError(
                f"sample.{unknown[0]} cannot vary in a sampler sweep; these can: "
                f"{', '.join(GRID_FIELDS)}"
            )
        try:
            cfg = SampleConfig.model_validate({**base.model_dump(), **entry})
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(str(p) for p in e["loc"])
            raise ValueError(
                f"sample.{field}={entry.get(field, e.get('input'))!r} in the sampler grid: {e['msg']}"
            ) from None
        if num_timesteps is not None and cfg.steps > num_timesteps:
            raise ValueError(
                f"steps {cfg.steps} in the sampler grid: more than the model's {num_timesteps} "
                "training timesteps"
            )
        if cfg.guidance_scale != 1.0 and conditional is False:
            raise ValueError(
                f"guidance {cfg.guidance_scale:g} in the sampler grid needs a class-conditional "
                "model (model.class_conditional=true); this checkpoint is unconditional: use "
                "guidance 1"
            )
        if cfg.eta != 0.0 and cfg.sampler != "ddim":
            raise ValueError(
                f"eta {cfg.eta:g} applies to the ddim sampler only, not {cfg.sampler!r}: set "
                "sample.eta=0 or sample only ddim"
            )
        if any(c.image_settings() == cfg.image_settings() for c in configs):
            raise ValueError(f"the sampler grid holds {describe_setting(cfg)} twice")
        configs.append(cfg)
    return configs


def nfe(cfg: SampleConfig) -> int:
    """Network evaluations per image of `cfg` (guidance doubles them; it needs a conditional
    model, which `grid_configs` checks)."""
    return network_evaluations(cfg.sampler, cfg.steps, guided=cfg.guidance_scale != 1.0)


def use_command(config_path: str | None, overrides: Sequence[str], cfg: SampleConfig) -> str:
    """The command line that runs the nightly with `cfg`'s setting (the same overrides work for
    `diffpipe sample` and `diffpipe evaluate`)."""
    varied = tuple(f"sample.{field}=" for field in GRID_FIELDS)
    kept = [o for o in overrides if not o.startswith(varied)]
    config = ["-c", config_path] if config_path else []
    return shlex.join(["diffpipe", "nightly", *config, *kept, *setting_overrides(cfg)])


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _trusted(m: Metrics, metric: MetricName) -> bool:
    values = m.values(metric)
    return bool(values) and all(math.isfinite(v) for v in values) and not m.problems


def sampler_choice(
    sets: Sequence[SampleSet],
    metrics: Sequence[Metrics],
    *,
    metric: MetricName,
    alpha: float,
    command: Mapping[str, str],
    stamp: str,
    report_keys: tuple[str, str],
    report_url: str,
) -> SamplerChoice:
    """Score each setting (its `metric` per seed range, its NFE), and choose the cheapest within
    the noise of the best: a paired t-test at `alpha` cannot call it worse (`tasks.compare.choose`).

    `command` maps each set's name to the command line that uses its setting. A setting whose
    metric is not finite, or whose samples are degenerate, is listed but never chosen."""
    if len(sets) != len(metrics):
        raise ValueError(f"{len(sets)} sample sets but {len(metrics)} evaluations")
    for s, m in zip(sets, metrics, strict=True):
        if m.samples_key != s.key:
            raise ValueError(f"metrics of {m.samples_key} given with samples {s.key}")
    ranges = {tuple(map(tuple, m.seed_ranges)) for m in metrics}
    if len(ranges) != 1:
        raise ValueError("the settings were scored on different seed ranges: nothing to compare")
    candidates = {
        s.name: Candidate(s.name, m.values(metric), cost=nfe(s.config))
        for s, m in zip(sets, metrics, strict=True)
        if _trusted(m, metric)
    }
    if not candidates:
        raise ValueError(
            f"no setting of the sweep has a trustworthy {metric.upper()} (finite, from samples "
            "that are not degenerate): nothing to choose"
        )
    picked = choose(list(candidates.values()), alpha)
    within = {c.name for c in picked.within_noise}
    scored = [
        ScoredSetting(
            name=describe_setting(s.config),
            sampler=s.config.sampler,
            steps=s.config.steps,
            spacing=s.config.spacing,
            guidance_scale=s.config.guidance_scale,
            eta=s.config.eta,
            nfe=nfe(s.config),
            values=m.values(metric),
            mean=_or_nan(m.value(metric)),
            std=m.std(metric),
            samples_key=s.key,
            metrics_key=m.key,
            within_noise=s.name in within,
            best=s.name == picked.best.name,
            chosen=s.name == picked.chosen.name,
            command=command[s.name],
            problems=m.problems,
        )
        for s, m in zip(sets, metrics, strict=True)
    ]
    first = metrics[0]
    return SamplerChoice(
        run_id=first.run_id,
        step=first.checkpoint_step,
        checkpoint_key=first.checkpoint_key,
        stamp=stamp,
        metric=metric,
        alpha=alpha,
        repeats=first.repeats,
        num_images=first.num_images,
        seed_ranges=first.seed_ranges,
        extractor=first.extractor.label,
        comparable_with_published=first.comparable_with_published,
        settings=scored,
        report_key=report_keys[0],
        report_html_key=report_keys[1],
        report_url=report_url,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
