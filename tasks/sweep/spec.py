"""A sweep's YAML, validated, and the trials it expands to (pure: no store, no Ray).

    name: lr                      # trials are the runs lr-t00, lr-t01, ...
    base: {config: configs/mnist.yaml, overrides: {train.steps: 400}}
    grid: {train.lr: [1e-4, 3e-4]}
    random: {n: 8, seed: 0, space: {train.ema_decay: {uniform: [0.99, 0.999]}}}
    seeds: 2                      # training-seed repeats of each setting
    segment_steps: 100            # each trial is scored every 100 steps (and at its last)
    scheduler: {kind: asha, grace_period: 100, reduction_factor: 2}
    budget_device_s: 3600
    max_concurrent: 2

Every trial's config is built and validated here, before anything runs: a bad field or value is
a `SweepSpecError` naming the trial's settings, the field and what would fix it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random as random_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks import layout
from tasks.config import (
    RENAMED,
    ConfigError,
    PipelineConfig,
    check_network,
    load_config,
    read_yaml,
    resolve_config,
)

Value = float | int | str | bool | None
# What a sweep must not vary: each trial's identity and where everything lives.
FIXED = ("train.run_id", "train.seed", "train.steps_per_night", "storage", "ray", "lease")


class SweepSpecError(ValueError):
    """A sweep YAML that does not validate; the message names the field."""


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class BaseSpec(_Spec):
    """The configuration every trial starts from: a config file and/or overrides over it."""

    config: str | None = None
    overrides: dict[str, Any] = {}


class Distribution(_Spec):
    """One field's random range: exactly one of these."""

    uniform: list[float] | None = None  # [low, high]
    loguniform: list[float] | None = None
    randint: list[int] | None = None  # [low, high], both included
    choice: list[Any] | None = None


class RandomSpec(_Spec):
    n: int = Field(ge=1)
    seed: int = 0
    space: dict[str, Distribution]


class SchedulerSpec(_Spec):
    """ASHA (asynchronous successive halving) or the median stopping rule; `none` runs every
    trial to its end. Periods are in training steps."""

    kind: Literal["asha", "median", "none"] = "asha"
    grace_period: int | None = Field(default=None, ge=1)  # None: one segment
    reduction_factor: float = Field(default=2.0, gt=1.0)


class SweepSpec(_Spec):
    name: str
    base: BaseSpec = BaseSpec()
    grid: dict[str, list[Any]] = {}
    random: RandomSpec | None = None
    seeds: int = Field(default=1, ge=1)
    segment_steps: int = Field(ge=1)
    scheduler: SchedulerSpec = SchedulerSpec()
    budget_device_s: float | None = Field(default=None, gt=0)
    max_concurrent: int = Field(default=1, ge=1)
    trial_max_failures: int = Field(
        default=2, ge=-1, description="Tune restarts of a failed trial (it resumes from its run)"
    )
    tune_storage: str | None = Field(
        default=None,
        description="Tune's experiment folder; default: sweeps/<name>/tune in a local store "
        "(an S3 store needs a local folder or a URI pyarrow reaches)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        layout.part(v, "sweep name")
        if len(v) > 58:  # '<name>-t000' must be a run id (64 characters at most)
            raise ValueError(f"sweep name {v!r} is longer than 58 characters")
        return v


@dataclass(frozen=True)
class TrialPlan:
    """One trial: its settings (dotted field -> value), training seed and resolved config."""

    trial_id: str
    run_id: str
    settings: dict[str, Value]
    seed: int
    config_id: str
    config: PipelineConfig
    segment_steps: int

    @property
    def segments(self) -> list[int]:
        """The steps at which the trial is scored: every `segment_steps`, and its last."""
        steps = self.config.train.steps
        return sorted({*range(self.segment_steps, steps, self.segment_steps), steps})


def read_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise SweepSpecError(f"sweep file {str(p)!r} not found")
    try:
        data = read_yaml(p.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - YAML's and decoding's errors, said as one
        raise SweepSpecError(f"sweep file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SweepSpecError(f"sweep file {str(p)!r} must hold a mapping (name, base, grid, ...)")
    base = data.get("base")
    if isinstance(base, dict) and isinstance(base.get("config"), str):
        # A base config path is relative to the sweep file.
        config = Path(base["config"])
        if not config.is_absolute():
            data = {**data, "base": {**base, "config": str(p.parent / config)}}
    return parse_spec(data, str(p))


def parse_spec(data: Mapping[str, Any], source: str = "sweep") -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(dict(data))
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        raise SweepSpecError(
            f"invalid sweep ({source}): {field}: {e['msg']} (got {e.get('input')!r})"
        ) from None
    for dotted in [*spec.grid, *(spec.random.space if spec.random else {})]:
        check_field(dotted)
    overlap = set(spec.grid) & set(spec.random.space if spec.random else {})
    if overlap:
        raise SweepSpecError(f"{sorted(overlap)[0]} is in both grid and random.space: keep one")
    for dotted, values in spec.grid.items():
        if not values:
            raise SweepSpecError(f"grid.{dotted} is empty: give at least one value")
    if spec.random:
        for dotted, d in spec.random.space.items():
            _check_distribution(dotted, d)
    return spec


def check_field(dotted: str) -> None:
    """`dotted` names a config field a sweep may vary, else a SweepSpecError saying why."""
    section, _, name = dotted.partition(".")
    if dotted in FIXED or section in FIXED:
        raise SweepSpecError(
            f"{dotted} cannot vary in a sweep: the sweep sets it for each trial "
            "(run ids, seeds via `seeds:`) or shares it (storage, ray, lease)"
        )
    model = PipelineConfig.model_fields.get(section)
    annotation = model.annotation if model is not None else None
    fields = getattr(annotation, "model_fields", None)
    if fields is None or not name or "." in name:
        sections = ", ".join(
            s for s in PipelineConfig.model_fields if s not in FIXED and s != "prices"
        )
        raise SweepSpecError(
            f"{dotted!r} is not a config field: write section.field with a section of {sections}"
        )
    name = RENAMED.get(section, {}).get(name, name)
    if name not in fields:
        raise SweepSpecError(
            f"{dotted!r} is not a config field: {section} has {', '.join(sorted(fields))}"
        )


def _check_distribution(dotted: str, d: Distribution) -> None:
    given = [k for k in ("uniform", "loguniform", "randint", "choice") if getattr(d, k) is not None]
    if len(given) != 1:
        raise SweepSpecError(
            f"random.space.{dotted}: give exactly one of uniform, loguniform, randint, choice "
            f"(got {', '.join(given) or 'none'})"
        )
    kind = given[0]
    if kind == "choice":
        if not d.choice:
            raise SweepSpecError(f"random.space.{dotted}.choice is empty")
        return
    ends = getattr(d, kind)
    if len(ends) != 2:
        raise SweepSpecError(f"random.space.{dotted}.{kind}: give [low, high], got {ends}")
    lo, hi = ends
    if not lo < hi if kind != "randint" else not lo <= hi:
        raise SweepSpecError(f"random.space.{dotted}.{kind}: [{lo}, {hi}] is empty; low < high")
    if kind == "loguniform" and lo <= 0:
        raise SweepSpecError(f"random.space.{dotted}.loguniform: the low end {lo:g} must be > 0")


def _draw(d: Distribution, rng: random_module.Random) -> Value:
    if d.uniform is not None:
        return rng.uniform(*d.uniform)
    if d.loguniform is not None:
        lo, hi = d.loguniform
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if d.randint is not None:
        return rng.randint(*d.randint)
    assert d.choice is not None
    value: Value = rng.choice(d.choice)
    return value


def settings_of(spec: SweepSpec) -> list[dict[str, Value]]:
    """Every setting the sweep runs: the grid's product, times the random draws (seeded)."""
    names = list(spec.grid)
    grid = [
        dict(zip(names, combo, strict=True)) for combo in itertools.product(*spec.grid.values())
    ]
    if spec.random is None:
        return grid
    rng = random_module.Random(spec.random.seed)
    draws = [{k: _draw(d, rng) for k, d in spec.random.space.items()} for _ in range(spec.random.n)]
    return [{**g, **r} for g in grid for r in draws]


def _config_id(settings: Mapping[str, Value]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _with(cfg: PipelineConfig, values: Mapping[str, Value]) -> PipelineConfig:
    tree = cfg.model_dump(mode="json")
    for dotted, value in values.items():
        section, name = dotted.split(".", 1)
        name = RENAMED.get(section, {}).get(name, name)
        tree[section] = {**(tree.get(section) or {}), name: value}
    return resolve_config(PipelineConfig.model_validate(tree))


def describe(settings: Mapping[str, Value]) -> str:
    """'train.lr=0.0003, model.base_channels=16' (floats to 4 significant digits)."""
    return (
        ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()
        )
        or "(base)"
    )


def plan_trials(spec: SweepSpec, base: PipelineConfig | None = None) -> list[TrialPlan]:
    """Every trial of the sweep (settings x training seeds), each config built and validated;
    `base` defaults to the spec's base config (loaded here)."""
    if base is None:
        try:
            base = load_config(
                spec.base.config,
                [f"{k}={as_override_text(v)}" for k, v in spec.base.overrides.items()],
            )
        except ConfigError as err:
            raise SweepSpecError(f"the sweep's base config: {err}") from None
    if base.evaluate.score_images > base.sample.num_images:
        raise SweepSpecError(
            f"evaluate.score_images={base.evaluate.score_images} exceeds sample.num_images="
            f"{base.sample.num_images}: the winner is confirmed on at least as many images"
        )
    if "fid" not in base.evaluate.metrics:
        raise SweepSpecError(
            f"a sweep scores FID, but evaluate.metrics is {list(base.evaluate.metrics)}: add fid"
        )
    plans: list[TrialPlan] = []
    all_settings = settings_of(spec)
    width = max(2, len(str(len(all_settings) * spec.seeds - 1)))
    for settings in all_settings:
        for repeat in range(spec.seeds):
            n = len(plans)
            trial_id = f"t{n:0{width}d}"
            run_id = f"{spec.name}-{trial_id}"
            try:
                cfg = _with(base, settings)
                cfg = _with(cfg, {"train.run_id": run_id, "train.seed": base.train.seed + repeat})
                check_network(cfg)
            except ValidationError as err:
                e = err.errors()[0]
                field = ".".join(str(p) for p in e["loc"])
                raise SweepSpecError(
                    f"trial {trial_id} ({describe(settings)}): {field}: {e['msg']} "
                    f"(got {e.get('input')!r})"
                ) from None
            except ConfigError as err:
                raise SweepSpecError(f"trial {trial_id} ({describe(settings)}): {err}") from None
            if cfg.train.steps < spec.segment_steps:
                raise SweepSpecError(
                    f"trial {trial_id}: train.steps={cfg.train.steps} is less than "
                    f"segment_steps={spec.segment_steps}: nothing would be scored before the end"
                )
            plans.append(
                TrialPlan(
                    trial_id=trial_id,
                    run_id=run_id,
                    settings=dict(settings),
                    seed=cfg.train.seed,
                    config_id=_config_id(settings),
                    config=cfg,
                    segment_steps=spec.segment_steps,
                )
            )
    return plans


def as_override_text(value: Any) -> str:
    """An override's value as `parse_override` reads it back."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def max_steps(plans: Sequence[TrialPlan]) -> int:
    return max(p.config.train.steps for p in plans)
