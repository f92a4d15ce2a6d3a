"""The whole nightly killed anywhere: a seeded schedule of SIGKILLs across every stage and every
kind of process a night runs (the `diffpipe` driver, a shard task, the training worker, a
sampling actor, a feature actor), a runner that lands them on a real `diffpipe nightly` and reruns
the night after each one that ends it, and the comparison of the store it leaves with an
uninterrupted night's. Used by tests/e2e/test_kill_anywhere.py (10 points) and
benchmarks/kill_anywhere.py (more).

A point fires when the night has visibly got that far (its stage's start line on stderr, then a
count in the store: a checkpoint step, sample receipts, feature files) plus a seeded delay; a
worker point then kills a process of that kind, preferring one busy in its method. No timing is
asserted: the deadlines only guard against a hang."""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import layout
from tests.support import procs
from tests.support.config import Settings, tiny_overrides
from tests.support.paths import REPO

DIFFPIPE = str(Path(sys.executable).parent / "diffpipe")
Say = Callable[[str], None]
STAGES = ("shard", "train", "sample", "evaluate", "promote", "report", "retention")

# A night small enough that its work is seconds, and with enough units in each stage to be killed
# between: 20 dataset shards written by shard tasks, 24 steps saved every 3, 6 seed ranges of 60
# sampler steps, 6 feature shards.
NIGHT: Settings = {
    "data": {"max_images": 160, "samples_per_shard": 8, "workers": 1},
    "train": {
        "steps": 24,
        "checkpoint_every": 3,
        "log_every": 3,
        "warmup_steps": 2,
        "workers": 1,
        # A night trains steps_per_night from where it found the run; a rerun of the night
        # stops at the target the night recorded (train_target.json), not 24 steps further.
        "steps_per_night": 24,
    },
    "sample": {"num_images": 12, "images_per_task": 2, "batch_size": 2, "steps": 60},
    "evaluate": {"repeats": 1, "metrics": ["fid"], "grid_images": 4},
    "ray": {"num_cpus": 2},
}
RUN = "nightly"
SEED_COUNT = 12  # sample.num_images
RANGES = 6  # of sample.images_per_task seeds, one sample shard and one feature shard each
CHECKPOINT_STEPS = list(range(3, 24, 3))

# The process a worker point kills: its Ray title, and the title while it runs its method.
TITLES = {
    "shard-task": (b"ray::write_chunk", b"ray::write_chunk"),
    "train-worker": (b"ray::RayTrainWorker", b"ray::RayTrainWorker.run_train_fn"),
    "sampler": (b"ray::SeedRangeSampler", b"ray::SeedRangeSampler.run"),
    "feature-actor": (b"ray::FeatureWorker", b"ray::FeatureWorker.shard"),
}
WORKER_OF = {
    "shard": "shard-task",
    "train": "train-worker",
    "sample": "sampler",
    "evaluate": "feature-actor",
}


@dataclass(frozen=True)
class Point:
    """Kill `target` (a TITLES kind, or "driver") once `stage` has started and its progress in the
    store reached `after`, `delay_s` later."""

    stage: str
    target: str
    after: int
    delay_s: float

    def describe(self) -> str:
        return f"{self.target:<13} in {self.stage:<9} after {self.after:>2} +{self.delay_s:.2f} s"


def schedule(seed: int, points: int) -> list[Point]:
    """`points` kills in the order the night reaches them: every worker kind once and the driver
    in a working stage and in promote/report/retention, then seeded extras; about a third of them
    driver kills (each costs a fresh `diffpipe` start)."""
    rng = random.Random(seed)
    drivers = max(2, round(points * 0.3))
    chosen = [(stage, kind) for stage, kind in WORKER_OF.items()]
    chosen += [(rng.choice(STAGES[:4]), "driver"), (rng.choice(STAGES[4:]), "driver")]
    while len(chosen) < points:
        if sum(k == "driver" for _, k in chosen) < drivers:
            chosen.append((rng.choice(STAGES), "driver"))
        else:  # the shard stage is done after its first attempt: its tasks die once; two
            # losses a stage survives by itself (train.max_failures, the actors' restarts), more
            # end the attempt, and a fresh start costs more than it tests
            stage = rng.choice(
                [s for s in STAGES[1:4] if chosen.count((s, WORKER_OF[s])) < 2] or STAGES[1:4]
            )
            chosen.append((stage, WORKER_OF[stage]))
    out = []
    for stage, target in chosen[:points]:
        # a shard task lives for a fraction of a second: it is killed when first seen
        # and the last stages take a fraction of a second each
        longest = 0.0 if target == "shard-task" else 0.6 if stage in STAGES[:4] else 0.15
        delay = round(rng.uniform(0.0, longest), 2)
        out.append(Point(stage, target, _after(rng, stage), delay))
    # the night's order; in a stage, a worker before the driver at the same progress
    return sorted(out, key=lambda p: (STAGES.index(p.stage), p.after, p.target == "driver"))


def _after(rng: random.Random, stage: str) -> int:
    """How far the stage has got when the point fires: early enough that work is left to kill."""
    if stage == "train":
        return rng.choice(CHECKPOINT_STEPS[:5])  # a step saved, 9 or more to go
    if stage in ("sample", "evaluate"):
        return rng.randrange(0, RANGES // 2 + 1)  # receipts / feature shards, of 6
    if stage in ("promote", "report"):
        return rng.randrange(0, 3)  # objects written by the stage
    return 0


def progress(store: Path, stage: str) -> int:
    """How far `stage` has got, read from the store (whichever attempt wrote it)."""
    run = store / "runs" / RUN
    if stage == "shard":
        return len(list(store.glob("datasets/*/*.tar")))
    if stage == "train":
        try:
            return int(json.loads((run / "checkpoints" / "latest.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return 0
    if stage == "sample":
        return len(list(run.glob("samples/*/shard-*.json")))
    if stage == "evaluate":
        return len(list(run.glob("samples/*/features/*/shard-*.npz")))
    if stage == "promote":
        return len([p for p in (store / "models").rglob("*") if p.is_file()])
    if stage == "report":
        return len(list(run.glob("nightly/*/*")))
    return 0


@dataclass
class Hit:
    point: Point
    attempt: int
    pid: int
    title: str  # the killed process's title (busy or idle)
    landed: str  # the last stage line the driver had printed


@dataclass
class Attempt:
    """One `diffpipe nightly` process, its stderr kept in a file and read as it comes."""

    number: int
    proc: subprocess.Popen[str]
    log: Path
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    seen: set[int] = field(default_factory=set)  # every process ever seen below it

    def look(self) -> dict[int, bytes]:
        below = procs.below(self.proc.pid)
        self.seen |= set(below)
        return below

    def started(self, stage: str) -> bool:
        line = f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage} ..."
        return any(line in s for s in self.lines)

    def finished(self, stage: str) -> bool:
        line = f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage} done"
        return any(line in s for s in self.lines)

    def stage_now(self) -> str:
        found = [m.group(1) for s in self.lines if (m := re.search(r"\] (\w+) (\.\.\.|done)", s))]
        return found[-1] if found else "start-up"


class Night:
    """Runs the night at `root` (store, Prefect home, logs) with TMPDIR `tmpdir` until it ends
    well, landing the points on the way."""

    def __init__(self, root: Path, tmpdir: Path, say: Say = print):
        self.root, self.tmpdir, self.say = root, tmpdir, say
        self.store = root / "store"
        self.attempts: list[Attempt] = []
        self.hits: list[Hit] = []
        self.missed: list[Point] = []

    def args(self) -> list[str]:
        return ["nightly", f"storage.root={self.store}", *tiny_overrides(NIGHT)]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "RAY_"))}
        return env | {"PREFECT_HOME": str(self.root / "prefect"), "TMPDIR": str(self.tmpdir)}

    def start(self) -> Attempt:
        n = len(self.attempts) + 1
        log = self.root / f"attempt-{n}.log"
        proc = subprocess.Popen(
            [DIFFPIPE, *self.args()],
            cwd=REPO,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        attempt = Attempt(n, proc, log)

        def read() -> None:
            assert proc.stdout is not None
            with log.open("w") as out:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    attempt.lines.append(line)

        attempt.reader = threading.Thread(target=read, daemon=True)
        attempt.reader.start()
        self.attempts.append(attempt)
        return attempt

    def run(self, points: list[Point], deadline_s: float = 1500) -> Attempt:
        """Attempts until one ends well with every point spent (fired, or missed because the
        night ended first); each point that ended an attempt (the driver, or a night that failed)
        is followed by a rerun. Returns the last attempt."""
        todo = list(points)
        deadline = time.monotonic() + deadline_s
        while True:
            assert len(self.attempts) < len(points) + 4, "the night keeps failing"
            attempt = self.start()
            while todo and attempt.proc.poll() is None:
                hit = self._fire(attempt, todo[0], deadline)
                if hit is None and attempt.proc.poll() is not None:
                    break  # the attempt ended first: the point waits for the next
                point = todo.pop(0)
                if hit is None:
                    self.missed.append(point)
                    self.say(f"  missed  {point.describe()} (attempt {attempt.number})")
                    continue
                self.hits.append(hit)
                self.say(
                    f"  killed  {point.describe()}: attempt {attempt.number}, pid {hit.pid} "
                    f"{hit.title!r}, during {hit.landed}"
                )
                if point.target == "driver":
                    break
            while attempt.proc.poll() is None:  # what it starts until it ends is checked too
                assert time.monotonic() < deadline, f"attempt {attempt.number} did not end"
                attempt.look()
                time.sleep(0.1)
            assert attempt.reader is not None
            attempt.reader.join(timeout=60)  # the rest of its output
            code = attempt.proc.returncode
            self.say(f"attempt {attempt.number}: exit {code} ({attempt.stage_now()})")
            # A driver killed after the night released its lease (between its last stage and
            # its exit) leaves a finished night: a rerun would be the next night.
            if code == 0 or (code == -signal.SIGKILL and self.finished_night()):
                self.missed += todo
                self._wait_for_tidy(deadline)
                return attempt

    def _fire(self, attempt: Attempt, point: Point, deadline: float) -> Hit | None:
        """Wait for the point's moment, then kill; None when the attempt ended first, or the
        stage ended with no process of the kind to kill."""
        while not (
            attempt.started(point.stage) and progress(self.store, point.stage) >= point.after
        ):
            if attempt.proc.poll() is not None:
                return None
            assert time.monotonic() < deadline, f"no {point} before the deadline"
            attempt.look()
            time.sleep(0.02)
        time.sleep(point.delay_s)
        if point.target == "driver":
            landed = attempt.stage_now()
            attempt.look()
            attempt.proc.send_signal(signal.SIGKILL)  # not sent once it has ended
            if attempt.proc.wait() != -signal.SIGKILL:
                return None
            return Hit(point, attempt.number, attempt.proc.pid, "diffpipe", landed)
        any_title, busy = TITLES[point.target]
        idle_since: float | None = None
        while attempt.proc.poll() is None and time.monotonic() < deadline:
            below = attempt.look()
            busy_pids = procs.outermost([p for p, c in below.items() if _title(c) == busy])
            idle = procs.outermost([p for p, c in below.items() if _title(c).startswith(any_title)])
            # an idle one only when none is busy for a while (a range ends, the next begins)
            idle_since = idle_since or (time.monotonic() if idle else None)
            waited = idle_since is not None and time.monotonic() - idle_since > 1.0
            pick = busy_pids or (idle if waited else [])
            if pick:
                pid = pick[0]
                title = _title(below[pid]).decode()
                landed = attempt.stage_now()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                return Hit(point, attempt.number, pid, title, landed)
            if attempt.finished(point.stage):
                return None
            time.sleep(0.02)
        return None

    def _wait_for_tidy(self, deadline: float) -> None:
        """Each attempt's watchdog ends what it started and removes its folders in the seconds
        after it ends (a rerun need not wait: it takes over the dead attempt's lease); wait for
        that once, at the end (the check is the caller's)."""
        limit = min(deadline, time.monotonic() + 60)
        while time.monotonic() < limit and (
            any(self.left_running(a) for a in self.attempts) or self.left_folders()
        ):
            time.sleep(0.25)

    def finished_night(self) -> bool:
        """Whether the night is reported and its lease released."""
        reported = self.store / layout.nightly_latest(RUN)
        lease = self.store / layout.lease_object(layout.run_lease_prefix(RUN))
        return reported.exists() and not lease.exists()

    def left_running(self, attempt: Attempt) -> list[int]:
        return [pid for pid in sorted(attempt.seen) if procs.running(pid)]

    def left_folders(self) -> list[str]:
        return sorted(
            p.name for p in self.tmpdir.iterdir() if p.name.startswith(("diffpipe-", "ray"))
        )


def _title(cmdline: bytes) -> bytes:
    return cmdline.split(b"\0")[0]


# -- the store a killed night leaves vs an uninterrupted night's --------------------------------

# Fields that say when, how long, where and at what cost a record was made, not what it holds.
VOLATILE = {
    "created",
    "created_at",
    "decided_at",
    "promoted_at",
    "started_at",
    "finished_at",
    "seconds",
    "usage",
    "cost",
    "host",
    "hostname",
    "pid",
    "stamp",
    "night",
    "report_url",
    "wall_s",
    "elapsed_s",
    "duration_s",
    "time",
    "timestamp",
    "written_at",
    "data_wait",
    "images_per_s",
    # the hash of a checkpoint's bytes, which hold the store's folder: the tensors are compared
    # (every other file with a recorded hash is compared by its bytes)
    "sha256",
}
# What the summary says of the night's last attempt, not of the night: which stages it found done
# (reused shards, the step it resumed from, the steps it trained) and how long each took.
ATTEMPT = {"stages", "shards_reused", "resumed_from", "trained_steps"}
# What is a log of the attempts, not an artifact: TensorBoard's event files (wall times), the
# report's rendering (its text says durations, its FID plot is over the nights' names; its data
# is summary.json, its sample grid is compared).
NOT_COMPARED = re.compile(r"(^|/)(tensorboard/|report\.(md|html)$|(fid|loss)\.png$)")


def normalized(value: Any, night: str, store: Path) -> Any:
    """`value` (parsed JSON) without VOLATILE and ATTEMPT fields, with the night's name as
    <night> and the store's folder as <store>."""
    if isinstance(value, dict):
        return {
            k: normalized(v, night, store) for k, v in value.items() if k not in VOLATILE | ATTEMPT
        }
    if isinstance(value, list):
        return [normalized(v, night, store) for v in value]
    if isinstance(value, str):
        return value.replace(night, "<night>").replace(str(store), "<store>")
    return value


def store_temp_files(store: Path) -> list[Path]:
    """The hidden temporary files of writes killed before they committed (`atomic_local_file`:
    `.tmp-<name>-<random>`). No reader lists them, and nothing removes them yet: the test shows
    them rather than comparing them (see the issue's report)."""
    return sorted(store.rglob(".tmp-*"))


def night_of(store: Path) -> str:
    nights = sorted(p.name for p in (store / "runs" / RUN / "nightly").iterdir() if p.is_dir())
    assert len(nights) == 1, f"one night's report folder expected in {store}: {nights}"
    return nights[0]


def files(store: Path, night: str) -> dict[str, Path]:
    """Every artifact below `store` by its path with the night's name as <night>."""
    out, temp = {}, set(store_temp_files(store))
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store).as_posix()
        if path.is_file() and not NOT_COMPARED.search(rel) and path not in temp:
            out[rel.replace(night, "<night>")] = path
    return out


def differences(store: Path, reference: Path) -> Iterator[str]:
    """Each artifact that differs between the two stores, and why. JSON records are compared
    without VOLATILE and ATTEMPT fields; .npz and .pt files, which stamp their members with the
    time or the store's folder, by their arrays and tensors, bitwise; every other file by its
    bytes."""
    nights = night_of(store), night_of(reference)
    mine, theirs = files(store, nights[0]), files(reference, nights[1])
    for rel in sorted(mine.keys() ^ theirs.keys()):
        yield f"{rel}: only in the {'killed' if rel in mine else 'uninterrupted'} night's store"
    for rel in sorted(mine.keys() & theirs.keys()):
        a, b = mine[rel].read_bytes(), theirs[rel].read_bytes()
        if a == b:
            continue
        if rel.endswith(".json"):
            x, y = json.loads(a), json.loads(b)
        elif rel.endswith(".npz"):  # np.savez stamps each member with the time it wrote it
            x, y = _npz(a), _npz(b)
        elif rel.endswith(".pt"):  # a checkpoint holds its config, the store's folder in it
            x, y = _pt(a), _pt(b)
        else:
            yield f"{rel}: the bytes differ ({len(a)} vs {len(b)} bytes)"
            continue
        x, y = normalized(x, nights[0], store), normalized(y, nights[1], reference)
        if (why := _first_difference(x, y)) is not None:
            yield f"{rel}: {why}"


def _npz(data: bytes) -> dict[str, Any]:
    """The arrays of an .npz as bytes with dtype and shape; `meta` (JSON) parsed."""
    import numpy as np

    with np.load(io.BytesIO(data)) as f:
        out: dict[str, Any] = {}
        for name in f.files:
            v = f[name]
            out[name] = (
                json.loads(str(v)) if name == "meta" else (str(v.dtype), v.shape, v.tobytes())
            )
        return out


def _pt(data: bytes) -> Any:
    """A torch.save archive of plain containers: tensors as bytes with dtype and shape, JSON
    strings (the config) parsed."""
    import torch

    def plain(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (
                str(v.dtype),
                tuple(v.shape),
                v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(),
            )
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, str) and v.startswith("{"):
            try:
                return json.loads(v)
            except ValueError:
                return v
        return v

    return plain(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


# FID's last digits are not reproducible even from bitwise-equal features (two uninterrupted
# nights differ by ~1e-9, relative: the eigendecompositions' BLAS), so a float is compared to
# this relative tolerance; the features, samples and weights it comes from are compared bitwise.
FLOAT_RTOL = 1e-6


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where the first difference between two normalized values lies, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys(), key=str):
            if k not in a or k not in b:
                return f"{where}.{k}: only in the {'killed' if k in a else 'uninterrupted'} night's"
            if (why := _first_difference(a[k], b[k], f"{where}.{k}")) is not None:
                return why
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (why := _first_difference(x, y, f"{where}[{i}]")) is not None:
                return why
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=FLOAT_RTOL):
        return None
    if a == b and type(a) is type(b):
        return None
    return f"{where or 'the record'}: {str(a)[:160]} (killed) vs {str(b)[:160]} (uninterrupted)"


def seeds_sampled(store: Path) -> list[list[int]]:
    """The seeds in each shard of the night's sample set (of the run's latest checkpoint), in
    the order the shards list them."""
    from tasks.records import Checkpoint
    from tasks.sample.stage import find_sample_set
    from tasks.storage import Store
    from tasks.webdata import iter_raw_samples
    from tests.support.config import tiny_config

    cfg = tiny_config(store, NIGHT)
    s = Store(cfg.storage)
    latest = Checkpoint.latest(s, RUN)
    assert latest is not None and latest.step == cfg.train.steps, latest
    samples = find_sample_set(s, latest, cfg.sample, cfg.evaluate.repeats)
    assert samples is not None, "no complete sample set"
    return [
        [json.loads(raw["json"])["seed"] for raw in iter_raw_samples(s, [shard.key])]
        for shard in samples.shards
    ]
