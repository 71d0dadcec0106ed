"""Who drives a rollout: a lease row in the controller database, not a pid file.

Exactly one process drives a rollout at a time: the holder of its lease (one row of
`driver_leases`: holder, host, pid, expiry). The driver renews it from its loop; one
that stops renewing (killed, host gone, loop wedged) keeps it only until it expires,
and then any controller on the same database, on any host, may take the rollout over
(`rollout resume`). On the holder's own host a dead holder is seen at once (its pid and
that process's start time), so a `resume` there does not wait out the expiry.

Expiry is on the database's clock (`Database.now_sql`), never a host's. Taking,
renewing and giving up are each one write transaction, serialized with every other
writer, and the driver checks that it still holds the lease inside the transaction that
records a command (`DriverLease.check`): a holder that lost its lease while stalled
records no command after that, so it publishes none (a command is stored before it is
published, and an assignment never gets a second one: rollout_store.py).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from controller.rollouts.store import Lease, RolloutStore
from protocol.errors import CodedError

# The lease lasts this long past each renewal; the driver renews every third of it, so
# a loop stalled for two renewals still holds it. A dead holder's rollout waits at most
# this long for another host.
DEFAULT_TTL_S = 15.0
HOST_ENV = "JETFLEET_HOST_ID"
TTL_ENV = "JETFLEET_LEASE_S"


class LeaseHeldError(CodedError, RuntimeError):
    """Another live process holds the rollout's lease: it drives the rollout."""

    code = "lease_held"

    def __init__(self, rollout_id: str, lease: Lease) -> None:
        super().__init__(
            f"rollout {rollout_id} is being driven by {lease.describe()} (its lease runs "
            f"{max(lease.expires_in, 0):.0f}s more and is renewed while it lives); use "
            "pause/resume/abort to steer it, or `resume --wait` to take over if it dies"
        )
        self.lease = lease


class LeaseLostError(CodedError, RuntimeError):
    """This driver's lease was taken over (it stalled past the expiry): it stops."""

    code = "lease_lost"

    def __init__(self, rollout_id: str, by: Lease | None) -> None:
        who = by.describe() if by is not None else "nobody"
        super().__init__(
            f"rollout {rollout_id}: this driver's lease expired and was taken over "
            f"({who} holds it now); this process stops driving it"
        )


def host_id() -> str:
    """The name this controller host goes by in leases: JETFLEET_HOST_ID, else the
    host name (set it where host names repeat, e.g. containers)."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def lease_ttl() -> float:
    """The lease duration: JETFLEET_LEASE_S (seconds), else DEFAULT_TTL_S."""
    try:
        ttl = float(os.environ.get(TTL_ENV, DEFAULT_TTL_S))
    except ValueError:
        return DEFAULT_TTL_S
    return ttl if ttl > 0 else DEFAULT_TTL_S


@dataclass(frozen=True)
class LeaseHolder:
    host: str
    pid: int
    started: float  # the process's start time: a reused pid is another process
    token: str  # tells two driver runs of one process apart

    @property
    def id(self) -> str:
        return f"{self.host}/{self.pid}/{self.token}"

    def row(self) -> tuple[str, str, int, float]:
        return (self.id, self.host, self.pid, self.started)

    @classmethod
    def this_process(cls) -> LeaseHolder:
        me = os.getpid()
        return cls(host_id(), me, psutil.Process(me).create_time(), uuid.uuid4().hex[:8])


def holder_gone(lease: Lease, here: str | None = None) -> bool:
    """Whether the lease's holder is known dead: a process of this host that no longer
    runs (a zombie, or its pid now another process's). On another host, only the expiry
    tells."""
    if lease.host != (here or host_id()):
        return False
    try:
        proc = psutil.Process(lease.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        return abs(proc.create_time() - (lease.pid_started or 0)) >= 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def current_driver(store: RolloutStore, rollout_id: str) -> Lease | None:
    """The live lease of whoever drives the rollout now; None when nobody does (no lease,
    an expired one, or a holder on this host that died)."""
    lease = store.lease(rollout_id)
    if lease is None or not lease.live or holder_gone(lease):
        return None
    return lease


class DriverLease:
    """This process's hold on one rollout: take it, renew it from the driver's loop,
    check it where a command is recorded, give it up at the end."""

    def __init__(
        self,
        store: RolloutStore,
        rollout_id: str,
        *,
        ttl_s: float | None = None,
        holder: LeaseHolder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.rollout_id = rollout_id
        self.ttl_s = ttl_s if ttl_s is not None else lease_ttl()
        self.holder = holder or LeaseHolder.this_process()
        self.clock = clock
        self._renewed = 0.0
        self.held = False

    def try_acquire(self) -> Lease | None:
        """Take the lease if it is free, expired, or its holder died on this host; None
        when taken, else the live lease in the way."""
        current = self.store.lease(self.rollout_id)
        gone = current is not None and holder_gone(current, self.holder.host)
        if current is not None and current.live and current.holder != self.holder.id and not gone:
            return current  # a live holder: no write transaction just to learn that
        replacing = current.holder if current is not None and gone else None
        lease = self.store.take_lease(
            self.rollout_id, self.holder.row(), self.ttl_s, replacing=replacing
        )
        if lease.holder != self.holder.id:
            return lease
        self.held = True
        self._renewed = self.clock()
        return None

    def acquire(self) -> None:
        """Take the lease now or raise LeaseHeldError."""
        in_the_way = self.try_acquire()
        if in_the_way is not None:
            raise LeaseHeldError(self.rollout_id, in_the_way)

    def wait_poll_s(self, lease: Lease) -> float:
        """How long a standby waits before looking again: until the expiry, at most half a
        second (a look at a live lease only reads; the standby shows progress meanwhile)."""
        return min(max(lease.expires_in, 0.05), 0.5)

    def renew_if_due(self) -> None:
        """From the driver's loop: renew every third of the lease; LeaseLostError when
        another holder has taken it."""
        if self.clock() - self._renewed < self.ttl_s / 3:
            return
        if not self.store.renew_lease(self.rollout_id, self.holder.id, self.ttl_s):
            self.held = False
            raise LeaseLostError(self.rollout_id, self.store.lease(self.rollout_id))
        self._renewed = self.clock()

    def check(self) -> None:
        """Inside the write transaction that records commands: still ours, or stop."""
        if not self.store.holds_lease(self.rollout_id, self.holder.id):
            self.held = False
            raise LeaseLostError(self.rollout_id, self.store.lease(self.rollout_id))

    def release(self) -> None:
        if self.held:
            self.store.drop_lease(self.rollout_id, self.holder.id)
            self.held = False
