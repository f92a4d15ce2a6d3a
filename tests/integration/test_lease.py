"""One writer per run, on the local store and on the S3 test server (moto, with its conditional
writes, and with the claims fallback for stores without them): a second writer fails at once naming
the holder, `--wait` waits and then runs, a SIGKILLed holder's lease is taken over after its timeout,
and concurrent promotions leave exactly one decision per night. The holders are processes of their
own; the CLI is the real `diffpipe`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tasks import layout
from tasks.config import LeaseConfig, PromoteConfig, StorageConfig
from tasks.lease import LeaseHeldError, LeaseHolder, conditional_writes, hold_lease, model_lease
from tasks.promote.stage import promote_if_better
from tasks.records import Champion, PromotionHistory
from tasks.storage import Store
from tests.support.config import tiny_overrides
from tests.support.paths import REPO
from tests.support.records import NIGHTS, checkpoint_record, metrics_record

# A process that holds a lease until its stdin closes (or it is killed); prints "held" once it holds.
_HOLDER = """
import sys
from tasks.config import LeaseConfig, StorageConfig
from tasks.lease import hold_lease
from tasks.storage import Store
root, endpoint, prefix, timeout_s, mode = sys.argv[1:]
store = Store(StorageConfig(root=root, endpoint_url=endpoint or None))
conditional = {"auto": None, "claims": False}[mode]
with hold_lease(store, prefix, LeaseConfig(timeout_s=float(timeout_s)), what="run 'r'",
                command="holder", flow_run="flow-run-1", conditional=conditional):
    print("held", flush=True)
    sys.stdin.read()
"""


class Holder:
    def __init__(self, cfg: StorageConfig, prefix: str, timeout_s: float, mode: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, cfg.root, cfg.endpoint_url or "", prefix]
            + [str(timeout_s), mode],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"held\n"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


@pytest.fixture(params=["local", "s3", "s3-claims"])
def where(request, tmp_path) -> Iterator[tuple[StorageConfig, str]]:
    """A store and the lease mechanism: local O_EXCL, S3 conditional writes, S3 claims."""
    if request.param == "local":
        yield StorageConfig(root=str(tmp_path / "store")), "auto"
        return
    s3_storage = request.getfixturevalue("s3_storage")
    yield s3_storage, "claims" if request.param == "s3-claims" else "auto"


def _conditional(mode: str) -> bool | None:
    return False if mode == "claims" else None


def test_the_s3_test_server_honours_conditional_writes(s3_storage):
    store = Store(s3_storage)
    assert conditional_writes(store, layout.run_lease_prefix("r"))
    assert store.list(layout.run_lease_prefix("r")) == []  # the probe is gone


def test_a_second_writer_fails_fast_naming_the_holder(where):
    cfg, mode = where
    prefix = layout.run_lease_prefix("r")
    holder = Holder(cfg, prefix, 60, mode)
    try:
        with (
            pytest.raises(LeaseHeldError) as err,
            hold_lease(
                Store(cfg),
                prefix,
                LeaseConfig(),
                what="run 'r'",
                command="nightly",
                conditional=_conditional(mode),
            ),
        ):
            pass
        text = str(err.value)
        assert f"pid {holder.proc.pid}" in text and "flow run flow-run-1" in text
        assert "`holder` on host" in text and "started " in text and "--wait" in text
    finally:
        holder.release()


def test_wait_waits_for_the_holder_then_runs(where):
    cfg, mode = where
    prefix = layout.run_lease_prefix("r")
    holder = Holder(cfg, prefix, 60, mode)
    acquired = threading.Event()
    seen: list[LeaseHolder] = []

    def waiter() -> None:
        with hold_lease(
            Store(cfg),
            prefix,
            LeaseConfig(timeout_s=4),  # looks again every second
            what="run 'r'",
            command="nightly",
            wait=True,
            conditional=_conditional(mode),
        ) as lease:
            seen.append(lease.holder)
            acquired.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        assert not acquired.wait(2.0), "acquired a lease that another process holds"
    finally:
        holder.release()
    thread.join(timeout=60)
    assert acquired.is_set() and seen[0].pid == os.getpid()


def test_a_killed_holders_lease_is_taken_over(where):
    """On the holder's own host a killed holder is seen to be gone: its lease is taken at once
    (a rerun after a SIGKILL need not wait). A holder on another host is only known dead by its
    expiry: its lease is refused until then, and taken after."""
    cfg, mode = where
    prefix = layout.run_lease_prefix("r")
    store = Store(cfg)
    lease_cfg = LeaseConfig(timeout_s=4)
    holder = Holder(cfg, prefix, 300, mode)  # would hold for 5 minutes
    holder.kill()
    with hold_lease(
        store,
        prefix,
        lease_cfg,
        what="run 'r'",
        command="nightly",
        conditional=_conditional(mode),
    ) as lease:  # no --wait: at once
        assert lease.holder.pid == os.getpid()

    holder = Holder(cfg, prefix, 4, mode)
    holder.kill()
    if mode == "claims":  # its claim, renamed to another host, is what contenders read
        key = next(k for k in store.list(prefix) if layout.is_lease_claim(prefix, k))
    else:
        key = layout.lease_object(prefix)
    away = json.loads(store.read_bytes(key))
    store.write_bytes(key, json.dumps({**away, "host": "another-host"}).encode())
    with (
        pytest.raises(LeaseHeldError, match="another-host"),
        hold_lease(
            store, prefix, lease_cfg, what="run 'r'", command="x", conditional=_conditional(mode)
        ),
    ):
        pass
    with hold_lease(
        store,
        prefix,
        lease_cfg,
        what="run 'r'",
        command="nightly",
        wait=True,
        conditional=_conditional(mode),
    ) as lease:
        assert lease.holder.pid == os.getpid()
        with (
            pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}"),  # ours now
            hold_lease(
                store,
                prefix,
                lease_cfg,
                what="run 'r'",
                command="x",
                conditional=_conditional(mode),
            ),
        ):
            pass


@pytest.mark.parametrize("where", ["local", "s3"], indirect=True)
def test_concurrent_promotions_leave_one_decision_per_night(where):
    cfg, mode = where
    store = Store(cfg)
    promote = PromoteConfig(min_improvement=0.01)
    nights = NIGHTS[:3]
    jobs = [(night, step) for step, night in enumerate(nights * 2, start=1)]  # each night twice
    ckpts = {step: checkpoint_record(step, store) for _, step in jobs}
    start = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def promote_one(night: str, step: int) -> None:
        start.wait()
        try:
            with model_lease(store, "default", LeaseConfig(timeout_s=4), command="t", wait=True):
                promote_if_better(store, promote, metrics_record(10.0 / step), ckpts[step], night)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=promote_one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    history = PromotionHistory.read(store, layout.model_history("default"))
    assert [d.night for d in history.decisions] == nights  # one each, none lost
    # current.json and history.json agree: the champion's night has its promoting decision in
    # the history (the last promotion in time may be a rerun of an earlier night), so neither
    # writer's update of the pair was lost.
    current = Champion.read(store, layout.model_current("default"))
    decision = next(d for d in history.decisions if d.night == current.night)
    assert decision.promoted and decision.promoted_key == current.checkpoint_key


def _diffpipe(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_diffpipe_nightly_refuses_a_held_run_and_promote_wait_waits(tmp_path):
    cfg = StorageConfig(root=str(tmp_path / "store"))
    overrides = tiny_overrides({"storage": {"root": cfg.root}, "train": {"run_id": "r"}})
    holder = Holder(cfg, layout.run_lease_prefix("r"), 60, "auto")
    try:
        nightly = _diffpipe("nightly", *overrides)
        out, err = nightly.communicate(timeout=120)
    finally:
        holder.release()
    assert nightly.returncode == 2, out + err
    assert "run 'r' is in use by `holder` on host" in err and f"pid {holder.proc.pid}" in err

    store = Store(cfg)
    for step, night in ((1, NIGHTS[0]), (2, NIGHTS[1])):
        metrics = metrics_record(10.0 / step)
        promote_if_better(
            store,
            PromoteConfig(min_improvement=0.01),
            metrics,
            checkpoint_record(step, store),
            night,
        )
    holder = Holder(cfg, layout.model_lease_prefix("default"), 60, "auto")
    rollback = _diffpipe("promote", "--rollback", "--wait", f"storage.root={cfg.root}")
    try:
        assert rollback.stderr is not None
        for line in rollback.stderr:  # it says what it waits for, then waits
            if "waiting for model 'default'" in line:
                break
        assert rollback.poll() is None
        assert Champion.read(store, layout.model_current("default")).step == 2
    finally:
        holder.release()
    out, err = rollback.communicate(timeout=120)
    assert rollback.returncode == 0, out + err
    assert "rolled back from step 2 to step 1" in out
