"""One driver per rollout through a lease in the database (controller/rollouts/lease.py), on
SQLite and PostgreSQL: taken by one of several at once, renewed, taken over only after
it expires (or at once on the holder's own host when its process is dead), and fenced:
a holder that lost it records no command. End to end: two real driver processes on two
"hosts" (JETFLEET_HOST_ID), the first killed -9 mid-wave; the second, waiting on
`rollout resume --wait`, takes over at the expiry and finishes with one command per
device."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fleet import CommandCounter, SimFleet, jetfleet_cmd, make_devices, wait_until

from controller.db import open_database
from controller.rollouts.lease import (
    DriverLease,
    LeaseHeldError,
    LeaseHolder,
    LeaseLostError,
    current_driver,
)
from controller.rollouts.store import RolloutStore
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet


def make_store(db: str, rid: str = "r-1") -> RolloutStore:
    store = RolloutStore(open_database(db))
    if store.get(rid) is None:
        store.create(
            rollout_id=rid, kind="deploy", model="detector", version="2.0.0", target="all",
            waves_spec="100%", waves=[["robot-1"]], max_failure_rate=0.0, wave_timeout=30.0,
            auto_rollback=True,
        )  # fmt: skip
    return store


def holder(host: str) -> LeaseHolder:
    return LeaseHolder(host=host, pid=os.getpid(), started=0.0, token=host)


def test_of_several_takers_one_holds_the_lease_until_it_expires_then_another(db: str) -> None:
    leases = [
        DriverLease(make_store(db), "r-1", ttl_s=2.0, holder=holder(f"host-{i}")) for i in range(4)
    ]
    barrier = threading.Barrier(4)
    results: list[object] = [None] * 4

    def take(i: int) -> None:
        barrier.wait()
        results[i] = leases[i].try_acquire()

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    first, second = leases[winners[0]], leases[(winners[0] + 1) % 4]
    with pytest.raises(LeaseHeldError, match="being driven by process"):
        second.acquire()
    assert current_driver(second.store, "r-1").host == first.holder.host  # type: ignore[union-attr]
    first.clock = lambda: time.monotonic() + 10  # its renewal is due
    first.renew_if_due()  # renewed from its loop: the others still see it live
    time.sleep(0.3)
    assert second.try_acquire() is not None
    # The holder stalls: nobody renews, the lease expires, the other takes it.
    wait_until(lambda: second.try_acquire() is None, timeout=5, what="the expiry")
    assert current_driver(first.store, "r-1").host == second.holder.host  # type: ignore[union-attr]
    first.clock = lambda: time.monotonic() + 100  # it wakes up: its renewal is due
    with pytest.raises(LeaseLostError, match="taken over"):
        first.renew_if_due()
    # Fencing: the stalled holder's next command-recording transaction refuses.
    with pytest.raises(LeaseLostError), first.store.transaction():
        first.check()
    first.release()  # gives up nothing it does not hold
    assert current_driver(first.store, "r-1").host == second.holder.host  # type: ignore[union-attr]
    second.release()
    assert first.store.lease("r-1") is None and current_driver(first.store, "r-1") is None


def test_on_its_own_host_a_dead_holder_is_replaced_at_once(db: str) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = make_store(db)
    gone = LeaseHolder(host="host-a", pid=dead.pid, started=time.time(), token="gone")
    store.take_lease("r-1", gone.row(), 60.0)
    elsewhere = DriverLease(make_store(db), "r-1", ttl_s=60.0, holder=holder("host-b"))
    assert elsewhere.try_acquire() is not None  # host-b cannot know: it waits for expiry
    here = DriverLease(make_store(db), "r-1", ttl_s=60.0, holder=holder("host-a"))
    assert here.try_acquire() is None
    assert store.lease("r-1").holder == here.holder.id  # type: ignore[union-attr]


def rollout_process(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        jetfleet_cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.slow
def test_a_second_host_takes_over_a_killed_driver_at_the_lease_expiry_with_one_command_each(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
    db: str,
) -> None:
    ttl = 3.0  # A's loop renews every second; a loaded machine may stall it a while
    base = {**env, "JETFLEET_DB": db, "JETFLEET_LEASE_S": str(ttl)}
    host_a, host_b = {**base, "JETFLEET_HOST_ID": "ctl-a"}, {**base, "JETFLEET_HOST_ID": "ctl-b"}
    store = RolloutStore(open_database(db))

    def lease_host() -> str | None:
        rid = next((r.id for r in store.recent(1)), None)
        lease = store.lease(rid) if rid else None
        return lease.host if lease else None

    with SimFleet(mosquitto.url, keys.trust, make_devices(4, step_s=1.0)) as fleet:
        a = rollout_process(
            host_a, "rollout", "start", str(bundle), "--target", "all", "--waves", "100%",
            "--wait", "--output", "json",
        )  # fmt: skip
        wait_until(lambda: lease_host() == "ctl-a", timeout=30, what="ctl-a's lease")
        rid = store.recent(1)[0].id
        b = rollout_process(host_b, "rollout", "resume", rid, "--wait", "--output", "json")
        wait_until(
            lambda: sum(1 for a in store.assignments(rid) if a.published_at) == 4,
            timeout=30,
            what="the wave in flight",
        )
        # ctl-b stands by while ctl-a lives (ctl-a renews its lease).
        status = rollout_process({**host_b, "COLUMNS": "200"}, "rollout", "status", rid)
        time.sleep(ttl * 1.25)
        assert lease_host() == "ctl-a" and b.poll() is None
        shown = status.communicate(timeout=60)[0].decode()
        assert f"driven by process {a.pid} on ctl-a" in shown
        assert a.poll() is None and lease_host() == "ctl-a"  # still mid-wave
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        killed = time.monotonic()
        wait_until(lambda: lease_host() == "ctl-b", timeout=ttl * 5, what="ctl-b's takeover")
        took = time.monotonic() - killed
        out, err = b.communicate(timeout=60)
        assert b.returncode == 0, err.decode()
        data = json.loads(out)
        assert data["rollout"]["state"] == "succeeded"
        assert [d["state"] for d in data["devices"]] == ["SUCCEEDED"] * 4
        # It waited for the expiry (ctl-a renewed every ttl/3 until the kill).
        assert took >= ttl / 3, took
        seen = counter.per_device()
        assert sorted(seen) == sorted(fleet.devices)
        for device, commands in seen.items():
            assert len(commands) == 1, (device, commands)
        assert all(d.commands_received == 1 for d in fleet.devices.values())
    assert store.lease(rid) is None  # ctl-b gave it up when the rollout ended
