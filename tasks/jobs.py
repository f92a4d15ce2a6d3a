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
from tasks.ray_runtime import bundles_that_fit, live_nodes

log = logging.getLogger(__name__)


def pool_size(cfg: RayConfig, bundle: dict[str, float], wanted: int | None, units: int) -> int:
    """Actors to start: `wanted`, else as many `bundle`s (e.g. {"CPU": 1, "GPU": 1}) as the
    cluster holds now (one per GPU with a GPU bundle); never more than `units`, at least 1.

    An autoscaling cluster may grow: with `wanted` unset it gets one actor per unit, and the
    autoscaler adds the nodes they wait for."""
    if wanted is not None:
        return max(1, min(wanted, units))
    if cfg.autoscaling:
        return max(1, units)
    return max(1, min(bundles_that_fit(live_nodes(), bundle), units))


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """`what: done/total images (pct%)  rate img/s  ETA` on the log, at most every `every_s`
    seconds and once at the end. Counts only the work done now (units found complete are
    `skip`ped), so the rate and ETA of a resumed job are honest.

    A job that learns its total as it goes (a listing streamed beside the work) starts with
    `total=None`, counts the units found so far in `listed`, and sets `total` once it knows it;
    until then the line shows `listed` in place of the total and no ETA."""

    def __init__(self, what: str, total: int | None, *, every_s: float = 5.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self.skipped = 0
        self.listed = 0
        self._start = time.monotonic()
        self._last_log = self._start

    def skip(self, n: int) -> None:
        self.skipped += n
        self.done += n

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if finished or now - self._last_log >= self.every_s:
            self._last_log = now
            log.info("%s", self.line(now))

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self._start
        worked = self.done - self.skipped
        return worked / elapsed if elapsed > 0 and worked > 0 else float("nan")

    def line(self, now: float | None = None) -> str:
        rate = self.rate(now)
        reused = f", {self.skipped} reused" if self.skipped else ""
        if self.total is None:
            return (
                f"{self.what}: {self.done} images ({self.listed} listed so far{reused})  "
                f"{rate:.1f} img/s"
            )
        left = max(self.total - self.done, 0)
        eta = left / rate if rate == rate and rate > 0 else float("nan")
        share = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.what}: {self.done}/{self.total} images ({share:.0f}%{reused})  "
            f"{rate:.1f} img/s  ETA {duration(eta)}"
        )
