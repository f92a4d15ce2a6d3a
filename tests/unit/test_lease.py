"""The lease's pure parts and the local store's conditional object: what a holder record says,
that every change is conditional on the version read, and that of many contenders one wins."""

from __future__ import annotations

import threading
import time

import pytest

from tasks import layout
from tasks.config import LeaseConfig, StorageConfig
from tasks.lease import (
    LeaseHeldError,
    LeaseHolder,
    _LocalObject,
    hold_lease,
    run_lease,
)
from tasks.storage import Store


def _holder(expires_at: float, token: str = "t1") -> LeaseHolder:
    return LeaseHolder(
        what="run 'r'",
        command="nightly",
        host="node-7",
        pid=4242,
        started_at="2026-11-25T02:00:00+00:00",
        flow_run="0f6c-flow-run",
        token=token,
        renewed_at=expires_at - 300,
        expires_at=expires_at,
    )


@pytest.fixture
def store(tmp_path):
    return Store(StorageConfig(root=str(tmp_path)))


def test_a_holder_round_trips_and_a_damaged_lease_reads_as_none():
    h = _holder(1000.0)
    assert LeaseHolder.parse(h.to_bytes()) == h
    assert LeaseHolder.parse(b'{"format": "diffusion-pipeline/lea') is None
    assert h.live(999.0) and not h.live(1000.0)
    renewed = h.renewed(2000.0, 60.0)
    assert (renewed.renewed_at, renewed.expires_at, renewed.token) == (2000.0, 2060.0, "t1")


def test_the_refusal_names_the_holder_and_how_to_wait():
    err = LeaseHeldError("run 'r'", _holder(time.time() + 100), "/s/runs/r/lease/lease.json")
    text = str(err)
    for part in ("run 'r' is in use by `nightly`", "host node-7", "pid 4242", "flow run 0f6c"):
        assert part in text
    assert "started 2026-11-25T02:00:00+00:00" in text and "--wait" in text
    assert "its lease.timeout_s = 300" in text  # the holder's


def test_every_change_of_the_local_lease_is_conditional_on_the_version_read(tmp_path):
    obj = _LocalObject(str(tmp_path / "lease" / "lease.json"))
    assert obj.read() is None
    v1 = obj.create(b"one")
    assert v1 is not None and obj.create(b"two") is None  # O_EXCL: it exists
    v2 = obj.replace(b"two", v1)
    assert v2 is not None and obj.read() == (b"two", v2)
    assert obj.replace(b"three", v1) is None  # a stale version changes nothing
    assert not obj.delete(v1) and obj.read() == (b"two", v2)
    assert obj.delete(v2) and obj.read() is None


def test_a_second_holder_is_refused_and_the_first_can_hold_again_after_release(store):
    cfg = LeaseConfig(timeout_s=60)
    with run_lease(store, "r", cfg, command="nightly", flow_run="flow-1") as lease:
        assert lease.holder.flow_run == "flow-1"
        with (
            pytest.raises(LeaseHeldError, match=r"flow run flow-1") as err,
            run_lease(store, "r", cfg, command="train"),
        ):
            pass
        assert err.value.holder.token == lease.holder.token
    with run_lease(store, "r", cfg, command="train"):  # released: free again
        pass
    assert not store.exists(layout.lease_object(layout.run_lease_prefix("r")))


def test_an_expired_lease_is_taken_over(store):
    prefix = layout.run_lease_prefix("r")
    dead = _holder(time.time() - 1)
    assert _LocalObject(store.path(layout.lease_object(prefix))).create(dead.to_bytes())
    with run_lease(store, "r", LeaseConfig(timeout_s=60), command="nightly") as lease:
        assert lease.holder.token != dead.token
        stored = LeaseHolder.parse(store.read_bytes(layout.lease_object(prefix)))
        assert stored == lease.holder


def test_the_holder_renews_its_lease_while_it_works(store):
    cfg = LeaseConfig(timeout_s=1.5)  # renewed every 0.5 s
    with run_lease(store, "r", cfg, command="nightly") as lease:
        first = lease.holder
        time.sleep(2.5)  # past the first expiry: only renewals keep it
        with pytest.raises(LeaseHeldError), run_lease(store, "r", cfg, command="train"):
            pass
        assert lease.holder.expires_at > first.expires_at and lease.lost is None


def test_of_many_contenders_exactly_one_holds(store):
    cfg = LeaseConfig(timeout_s=60)
    start, done = threading.Barrier(8), threading.Barrier(8)
    won: list[int] = []
    refused: list[int] = []

    def contend(i: int) -> None:
        start.wait()
        try:
            with hold_lease(
                store, layout.run_lease_prefix("r"), cfg, what="run 'r'", command=f"c{i}"
            ):
                won.append(i)
                done.wait()  # hold until every contender has tried
        except LeaseHeldError:
            refused.append(i)
            done.wait()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
