"""A sweep's budget in device-seconds (pure: no store, no Ray; `tasks.sweep.stage` runs `Budget`
as a Ray actor that every trial asks before each segment).

What a segment costs is what it *reserved*, not what it used: its training's wall seconds times the
devices its workers hold (`train.workers` x `train.cpus_per_worker` CPUs, or `train.workers` GPUs
with `train.use_gpu`), plus its scoring's wall seconds times the one sampling and one feature
worker's devices. GPU-seconds when the sweep trains on GPUs (scoring's CPU-only workers then count
nothing), else CPU-seconds.

The sweep never starts a segment that could cross the budget: a trial reserves its next segment's
estimated cost first (its own last cost per step, else the sweep's dearest per step and device so
far, times the steps), and a segment is granted only while spent + reserved + estimate <= budget.
Before any segment is measured, one segment runs alone to measure it: a budget smaller than that
one segment is crossed by it (the report says by how much).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.config import PipelineConfig


def device_unit(cfg: PipelineConfig) -> str:
    return "GPU" if cfg.train.use_gpu else "CPU"


def train_devices(cfg: PipelineConfig) -> float:
    t = cfg.train
    return float(t.workers) if t.use_gpu else t.workers * t.cpus_per_worker


def score_devices(cfg: PipelineConfig) -> float:
    """One sampling and one feature worker (`tasks.sweep.stage` scores on one each)."""
    if cfg.train.use_gpu:
        return float(cfg.sample.use_gpu) + float(cfg.evaluate.use_gpu)
    return (0.0 if cfg.sample.use_gpu else cfg.sample.cpus_per_worker) + (
        0.0 if cfg.evaluate.use_gpu else cfg.evaluate.cpus_per_worker
    )


def segment_cost(cfg: PipelineConfig, train_s: float, score_s: float) -> float:
    """Device-seconds one segment reserved."""
    return train_s * train_devices(cfg) + score_s * score_devices(cfg)


@dataclass
class Budget:
    """The sweep's ledger of device-seconds: spent (measured segments) and reserved (segments
    running now). `limit` None: no budget, every segment is granted."""

    limit: float | None
    spent: float = 0.0
    reserved: dict[str, float] = field(default_factory=dict)
    # device-seconds per step and per training device, the dearest measured so far
    rate: float | None = None
    # the first segment that was refused: (trial, step, estimate), for the report
    refused: tuple[str, int, float] | None = None

    def reserve(
        self, trial: str, step: int, steps: int, devices: float, own_rate: float | None
    ) -> str:
        """Ask for a segment of `steps` steps of `trial` (ending at `step`): 'granted',
        'wait' (the first segment is being measured), or 'refused' (it could cross the budget)."""
        if self.limit is None:
            self.reserved[trial] = 0.0
            return "granted"
        rate = own_rate if own_rate is not None else self.rate
        if rate is None:  # nothing measured yet: one segment alone measures it
            if self.reserved:
                return "wait"
            estimate = 0.0
        else:
            estimate = rate * steps * (1.0 if own_rate is not None else devices)
        if self.spent + sum(self.reserved.values()) + estimate > self.limit or (
            rate is None and self.spent >= self.limit
        ):
            if self.refused is None:
                self.refused = (trial, step, estimate)
            return "refused"
        self.reserved[trial] = estimate
        return "granted"

    def settle(self, trial: str, cost: float, steps: int, devices: float) -> None:
        """The segment of `trial` ended, having cost `cost` device-seconds over `steps` steps."""
        self.reserved.pop(trial, None)
        self.spent += cost
        if steps > 0 and devices > 0:
            per = cost / steps / devices
            self.rate = per if self.rate is None else max(self.rate, per)

    def release(self, trial: str) -> None:
        """The segment of `trial` ended without a cost to settle (it failed or was stopped)."""
        self.reserved.pop(trial, None)

    def state(self) -> tuple[float, tuple[str, int, float] | None]:
        return self.spent, self.refused
