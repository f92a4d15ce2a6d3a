"""The whole nightly killed anywhere (tests/support/killer.py): ten SIGKILLs at seeded points
across every stage and every kind of process a night runs, a rerun after each one that ends the
night, and then the store compared with an uninterrupted night's: the same checkpoint, sample
shards, features, metrics, decision and report data, every seed sampled once, and nothing left
running or lying in the run's temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tasks import layout
from tasks.config import LeaseConfig
from tasks.lease import CONTINUE_NIGHT_S, LeaseHolder, interrupted_nights, run_lease
from tasks.records import PromotionHistory
from tasks.storage import Store
from tests.support import killer
from tests.support.config import tiny_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc"),
]
SEED = int(os.environ.get("DIFFPIPE_KILL_SEED", "7"))
POINTS = 10


@pytest.fixture
def tmpdirs():
    """A short temp folder for each night (Ray's socket paths below TMPDIR stay under 108
    bytes), to see what each leaves."""
    paths = [Path(tempfile.mkdtemp(prefix="dpk-", dir="/tmp")) for _ in range(2)]
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(1800, func_only=True)  # a guard against a hang, not a measure
def test_the_nightly_killed_anywhere_ends_as_an_uninterrupted_night(tmp_path, tmpdirs):
    points = killer.schedule(SEED, POINTS)
    print(f"\nschedule (seed {SEED}):", *(f"  {p.describe()}" for p in points), sep="\n")

    # The uninterrupted night, at the same time in its own store and temporary folder.
    (tmp_path / "straight").mkdir()
    straight = killer.Night(tmp_path / "straight", tmpdirs[1], say=lambda _: None)
    failed: list[BaseException] = []

    def run_straight() -> None:
        try:
            straight.run([])
        except BaseException as err:  # noqa: BLE001 - reported by the test's thread
            failed.append(err)

    thread = threading.Thread(target=run_straight)
    thread.start()
    (tmp_path / "killed").mkdir()
    night = killer.Night(tmp_path / "killed", tmpdirs[0])
    try:
        last = night.run(points)
    finally:
        thread.join()
    assert not failed, failed
    assert len(straight.attempts) == 1
    diffs = list(killer.differences(night.store, straight.store))
    left = killer.store_temp_files(night.store)
    print(f"temporary files of killed writes left in the store: {len(left)}", *left, sep="\n")
    print(f"{len(night.attempts)} attempts; artifacts that differ: {len(diffs)}", *diffs, sep="\n")

    # Every point landed, on every kind of process, in every stage the schedule names.
    assert not night.missed, [p.describe() for p in night.missed]
    assert len(night.hits) == POINTS
    kinds = {h.point.target for h in night.hits}
    assert kinds == {"driver", *killer.TITLES}, kinds
    assert {h.point.stage for h in night.hits} >= {"shard", "train", "sample", "evaluate"}
    drivers = sum(h.point.target == "driver" for h in night.hits)
    assert len(night.attempts) >= drivers + 1
    assert night.finished_night(), "".join(last.lines[-40:])  # reported, its lease released

    # Nothing left running or lying in either temporary folder.
    for n in (night, straight):
        for attempt in n.attempts:
            assert not n.left_running(attempt), (attempt.number, n.left_running(attempt))
        assert not n.left_folders(), n.left_folders()

    # The killed night's store is the uninterrupted night's, artifact for artifact.
    assert not diffs, "\n".join(diffs)
    # ... which holds one promoting decision for the night, and every seed sampled once.
    history = json.loads((night.store / layout.model_history("default")).read_text())
    assert len(history["decisions"]) == 1 and history["decisions"][0]["promoted"], history
    PromotionHistory.model_validate(history)
    shards = killer.seeds_sampled(night.store)
    for seeds in shards:
        assert seeds == list(range(seeds[0], seeds[0] + len(seeds))), shards  # a range, in order
    assert sorted(s for seeds in shards for s in seeds) == list(range(killer.SEED_COUNT)), shards


def test_a_nightly_that_died_holding_its_lease_leaves_its_night_to_the_next(tmp_path):
    """What lets the rerun above continue the killed night (its report folder, its decision):
    the lease of a nightly that died names its night; a live holder's, a released one's or a
    training's does not count."""
    store = Store(tiny_config(tmp_path).storage)
    key = layout.lease_object(layout.run_lease_prefix("r"))
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a pid of this host that no longer runs: a SIGKILLed nightly

    def holder(pid: int, command: str = "nightly", age_s: float = 0.0) -> LeaseHolder:
        now = time.time() - age_s
        return LeaseHolder(
            what="run 'r'",
            command=command,
            host=socket.gethostname(),
            pid=pid,
            started_at="2026-11-25T02:00:04+00:00",
            token="t",
            renewed_at=now,
            expires_at=now + 300,
            night="20261125T020000Z",
        )

    assert interrupted_nights(store, "r") == []
    store.write_bytes(key, holder(gone.pid).to_bytes())
    assert interrupted_nights(store, "r") == ["20261125T020000Z"]
    # a night that died yesterday is not continued by today's scheduled nightly
    store.write_bytes(key, holder(gone.pid, age_s=CONTINUE_NIGHT_S + 60).to_bytes())
    assert interrupted_nights(store, "r") == []
    store.write_bytes(key, holder(gone.pid, command="train").to_bytes())
    assert interrupted_nights(store, "r") == []
    store.write_bytes(key, holder(os.getpid()).to_bytes())  # alive: its night goes on
    assert interrupted_nights(store, "r") == []
    store.delete(key)
    with run_lease(store, "r", LeaseConfig(), command="nightly", night="20261126T020000Z"):
        assert interrupted_nights(store, "r") == []
        assert LeaseHolder.parse(store.read_bytes(key)).night == "20261126T020000Z"
    assert interrupted_nights(store, "r") == []  # released at its end
