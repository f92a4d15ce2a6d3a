"""Long jobs on pools of Ray actors: how many actors, and the driver's console progress.

Sampling and feature extraction work through many units (seed ranges, shards) on a pool of
long-lived actors, each loading its network once. The driver only hands out units and gathers small
results, so its memory does not grow with the job; it logs the progress as `train` does: units
done, rate and the time left.
"""

from __future__ import annotations

import logging
import math
import time

from tasks.config import RayConfig

log = logging.getLogger(__name__)


def pool_size(cfg: RayConfig, bundle: dict[str, float], wanted: int | None, units: int) -> int:
    """Actors to start: `wanted`, else as many `bundle`s (e.g. {"CPU": 1, "GPU": 1}) as the
    cluster holds now (one per GPU with a GPU bundle); never more than `units`, at least 1.

    An autoscaling cluster may grow: with `wanted` unset it gets one actor per unit, and the
    autoscaler adds the nodes they wait for."""
    if wanted is not None:
        return max(1, min(wanted, units))
    import ray

    if cfg.autoscaling:
        return max(1, units)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = sum(
        int(min(n.get(r, 0.0) / amount for r, amount in bundle.items() if amount > 0))
        for n in nodes
    )
    return max(1, min(fits, units))


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """`what: done/total images  rate img/s  ETA` on the log, at most every `every_s` seconds
    and once at the end. Counts only the work done now (units found complete are `skip`ped), so
    the rate and ETA of a resumed job are honest."""

    def __init__(self, what: str, total: int, *, every_s: float = 5.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self.skipped = 0
        self._start = time.monotonic()
        self._last_log = self._start

    def skip(self, n: int) -> None:
        self.skipped += n
        self.done += n

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last_log >= self.every_s:
            self._last_log = now
            log.info("%s", self.line(now))

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self._start
        worked = self.done - self.skipped
        return worked / elapsed if elapsed > 0 and worked > 0 else float("nan")

    def line(self, now: float | None = None) -> str:
        rate = self.rate(now)
        eta = (self.total - self.done) / rate if rate == rate and rate > 0 else float("nan")
        reused = f" ({self.skipped} reused)" if self.skipped else ""
        return (
            f"{self.what}: {self.done}/{self.total} images{reused}  {rate:.1f} img/s  "
            f"ETA {duration(eta)}"
        )
