"""Rollouts as they go, in SQLite: the rollout, its waves, one assignment per device
(with the exact signed command sent to it) and the events seen.

The store is what makes `rollout resume` safe after a kill -9: a command is written here,
signed envelope included, before it is published, and an assignment that has a command
never gets another one; resume re-publishes that same envelope when the broker never
acknowledged it (the agent remembers command ids, so a repeat is a no-op there).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from controller.db import Database
from controller.db import is_disk_full as is_disk_full  # re-exported: the CLI's checks
from controller.db.migrations import AddColumn, Step, migrate
from controller.rollouts.policy import OFFLINE_CODE, RolloutPolicy
from protocol.errors import CodedError
from protocol.messages import FAILURE_STATES, PIPELINE, JobState, ReasonCode

# Assignment states besides the agent's job states (docs/protocol.md).
WAITING = "WAITING"  # its wave has not started: no command exists
PENDING = "PENDING"  # commanded, no event yet (e.g. the device is offline)
NO_PREVIOUS = "NO_PREVIOUS"  # a rollback that cannot be sent: no earlier version known
# In the event log only: a device refused a message naming the command (a repeat, junk
# carrying its id); not a state of the job.
REFUSED = "REFUSED"
# The code of a STAGED device whose abort's cancel was not answered within the wave
# timeout (state TIMED_OUT): it may still hold the staged engine, so it is listed as
# such; not a failure of the model (it staged).
CANCEL_UNACKED = "cancel_unacknowledged"

# Below this much free space on the database's disk a writer is about to fail.
NEARLY_FULL_BYTES = 1 << 20

TERMINAL = frozenset(s.value for s in JobState if s.terminal)
FAILED = frozenset(s.value for s in FAILURE_STATES)
ON_HOLD = JobState.ON_HOLD.value
# A staged deploy (`rollout start --stage`): gated and parked, the old engine serving. In
# the stage phase it is where a device's wave ends; in the activation phase it is where a
# device waits for its `activate` command.
JOB_STAGED = JobState.STAGED.value
# Rollout phases (rollouts.phase; NULL: a plain rollout). `stage`: deploys with stage:true,
# the rollout ends `staged`; `activate`: `rollout activate` switches the staged devices.
STAGE = "stage"
ACTIVATE = "activate"
_PIPELINE_ORDER = {s.value: i for i, s in enumerate(PIPELINE[:-1])}  # not SUCCEEDED
# The same order in SQL, over an assignment's state (-1: not a pipeline step, e.g. PENDING).
_ORDER_SQL = (
    "(CASE state "
    + " ".join(f"WHEN '{k}' THEN {v}" for k, v in _PIPELINE_ORDER.items())
    + " ELSE -1 END)"
)

# A deploy command's job moves to a reported state if that is progress: not from a terminal
# state, and to a terminal one or one further down the pipeline (`advances`, in SQL).
_ADVANCE_SQL = (
    "UPDATE assignments SET state=?, reason=?, code=?, last_seq=?, "
    "gate=COALESCE(?, gate), updated_at=? WHERE command_id=? AND device_id=? "
    f"AND state NOT IN ({','.join('?' for _ in TERMINAL)}) AND (?=1 OR {_ORDER_SQL} < ?) "
    "RETURNING rollout_id, device_id"
)


@dataclass(frozen=True)
class JobStep:
    """A job event as `advance_jobs` applies it."""

    command_id: str
    state: str
    device_id: str
    seq: int | None = None
    reason: str | None = None
    code: str | None = None
    gate: dict[str, Any] | None = None


# Rollout states.
SCHEDULED = "scheduled"  # --start-at in the future: stored, holds its devices, sends nothing
RUNNING = "running"
PAUSED = "paused"
# --approve-waves: a wave ended within the abort criteria; the next waits for `promote`.
WAITING_APPROVAL = "waiting_approval"
ABORTING = "aborting"  # threshold crossed or operator abort: waits for the wave, rolls back
SUCCEEDED = "succeeded"
ABORTED = "aborted"
# --stage: every wave ended with its devices STAGED (or finished otherwise); nothing is
# driven until `rollout activate` (or `abort`, which cancels the staged jobs).
STAGED = "staged"
FINISHED = frozenset({SUCCEEDED, ABORTED})
# Where a driver stops: the rollout finished, or waits staged for the operator.
AT_REST = FINISHED | {STAGED}
# Rollouts that may still send a device a command (an aborting one sends cancels and
# rollbacks; a staged one holds its devices for the activation).
UNFINISHED = frozenset({SCHEDULED, RUNNING, PAUSED, WAITING_APPROVAL, ABORTING, STAGED})


class DevicesHeldError(CodedError, RuntimeError):
    """Target devices that another unfinished rollout still drives: two rollouts sending
    one device commands at once would race each other's versions."""

    code = "devices_held"

    def __init__(self, holders: dict[str, str]) -> None:
        self.holders = dict(sorted(holders.items()))
        by_rollout: dict[str, list[str]] = {}
        for device, rollout_id in self.holders.items():
            by_rollout.setdefault(rollout_id, []).append(device)
        parts = []
        for rollout_id, devices in sorted(by_rollout.items()):
            shown = ", ".join(devices[:10]) + (
                f" and {len(devices) - 10} more" if len(devices) > 10 else ""
            )
            parts.append(f"{shown} (rollout {rollout_id})")
        super().__init__(
            f"{len(self.holders)} target device(s) are still being driven by another rollout: "
            f"{'; '.join(parts)}; wait for it to finish, abort it, or pass --force"
        )


def disk_nearly_full(db: Path) -> int | None:
    """Free bytes on the database's disk when a write there would fail, else None."""
    try:
        free = shutil.disk_usage(Path(db).parent).free
    except OSError:
        return None
    return free if free < NEARLY_FULL_BYTES else None


def rollouts_in_flight(conn: Database) -> dict[tuple[str, str], str]:
    """(device, model) -> id of an unfinished deploy or rollback rollout that holds it
    (a read-only connection; none before the first rollout)."""
    if not conn.columns("assignments"):
        return {}
    rows = conn.execute(
        "SELECT a.device_id, r.model, r.id FROM assignments a JOIN rollouts r ON "
        "a.rollout_id = r.id WHERE r.state NOT IN ('succeeded', 'aborted') "
        "AND r.kind IN ('deploy', 'rollback')"
    ).fetchall()
    return {(d, m): rid for d, m, rid in rows}


def rollout_state_counts(
    conn: Database,
) -> tuple[dict[str, int], dict[str, int] | None] | None:
    """(rollouts by state, assignments by job state) of a database opened read-only,
    whatever release wrote it: None without a rollouts table, no assignment counts
    without that table."""
    cols = conn.columns("rollouts")
    state_col = next((c for c in ("state", "status") if c in cols), None)
    if state_col is None:
        return None
    rollouts = {
        str(state): int(n)
        for state, n in conn.execute(
            f"SELECT {state_col}, COUNT(*) FROM rollouts GROUP BY {state_col}"
        )
    }
    if "state" not in conn.columns("assignments"):
        return rollouts, None
    assignments = {
        str(state): int(n)
        for state, n in conn.execute("SELECT state, COUNT(*) FROM assignments GROUP BY state")
    }
    return rollouts, assignments


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- deploy | rollback | trust_update
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,           -- deployed version, or the version rolled back to
    bundle_url TEXT,
    bundle_sha256 TEXT,
    bundle_size INTEGER,
    target TEXT NOT NULL,
    waves_spec TEXT NOT NULL,
    max_failure_rate REAL NOT NULL,
    wave_timeout REAL NOT NULL,
    auto_rollback INTEGER NOT NULL,
    canary TEXT,
    abort_reason TEXT,
    rollback_on_abort INTEGER NOT NULL DEFAULT 1,
    driver_pid INTEGER,
    driver_started REAL,
    payload TEXT,                    -- trust_update: the trust root's DSSE envelope (JSON)
    policy TEXT                      -- RolloutPolicy as JSON (NULL: the default policy)
);
CREATE TABLE IF NOT EXISTS waves (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    idx INTEGER NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,             -- pending | running | done | rollback
    started_at REAL,
    deadline REAL,
    ended_at REAL,
    PRIMARY KEY (rollout_id, idx)
);
CREATE TABLE IF NOT EXISTS assignments (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    position INTEGER NOT NULL,
    command_id TEXT UNIQUE,
    envelope BLOB,
    published_at REAL,
    state TEXT NOT NULL,
    reason TEXT,
    code TEXT,
    last_seq INTEGER,
    gate TEXT,
    prev_version TEXT,
    updated_at REAL,
    rb_command_id TEXT UNIQUE,
    rb_envelope BLOB,
    rb_published_at REAL,
    rb_to_version TEXT,
    rb_state TEXT,
    rb_reason TEXT,
    rb_last_seq INTEGER,
    cx_command_id TEXT UNIQUE,       -- cancel sent when the rollout aborted mid-wave
    cx_envelope BLOB,
    cx_published_at REAL,
    commanded_at REAL,               -- when its command was released (--max-per-minute)
    attempts INTEGER NOT NULL DEFAULT 0,  -- retries sent so far (--retries)
    retry_at REAL,                   -- a retry's command is not released before this
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS assignments_wave ON assignments(rollout_id, wave);
CREATE TABLE IF NOT EXISTS rollout_events (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    command_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    code TEXT,
    at TEXT,
    received_at REAL NOT NULL,
    PRIMARY KEY (device_id, command_id, seq)
);
"""

# SLO bakes (controller/rollouts/slo.py): a migration step of its own, after the added columns.
_SLO_SCHEMA = """
CREATE TABLE IF NOT EXISTS slo_bakes (
    rollout_id TEXT NOT NULL,
    wave INTEGER NOT NULL,           -- the wave whose devices bake
    started_at REAL NOT NULL,        -- the window the SLOs are judged over starts here
    state TEXT NOT NULL,             -- baking | passed | failed | inconclusive
    ended_at REAL,
    PRIMARY KEY (rollout_id, wave)
);
CREATE TABLE IF NOT EXISTS slo_verdicts (
    rollout_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    slo TEXT NOT NULL,               -- the expression, normalized
    at REAL NOT NULL,                -- the latest judgement (a short bake is judged again)
    verdict TEXT NOT NULL,           -- PASS | FAIL | NOT_ENOUGH_DATA
    reason TEXT NOT NULL,
    figures TEXT NOT NULL,           -- JSON: cohorts, means, change, interval, threshold
    PRIMARY KEY (rollout_id, wave, slo)
);
"""

# Staged activation (`rollout start --stage`, `rollout activate`): the phase, when the
# activation began, and each device's signed `activate` command (stored before it is
# published, like the deploy). A migration step of its own after the leases.
_STAGE_COLUMNS = (
    ("rollouts", "phase", "TEXT"),
    ("rollouts", "activated_at", "REAL"),
    ("assignments", "ac_command_id", "TEXT"),
    ("assignments", "ac_envelope", "BLOB"),
    ("assignments", "ac_published_at", "REAL"),
)
_STAGE_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS assignments_activate ON assignments(ac_command_id);"
)

# Driver leases (controller/rollouts/lease.py): one row per driven rollout. Times are the
# database's clock (Database.now_sql).
_LEASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS driver_leases (
    rollout_id TEXT PRIMARY KEY,
    holder TEXT NOT NULL,            -- HOST/PID/TOKEN: one driver run
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_started REAL,                -- the process's start time (a reused pid is another)
    acquired_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Lease:
    """A rollout's driver lease as stored, with `expires_in` seconds on the database's
    clock (negative: expired)."""

    rollout_id: str
    holder: str
    host: str
    pid: int
    pid_started: float | None
    expires_in: float

    @property
    def live(self) -> bool:
        return self.expires_in > 0

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


@dataclass(frozen=True)
class JobRow:
    """A command's assignment as an event needs it (`RolloutStore.job`)."""

    rollout_id: str
    device_id: str
    command_id: str
    is_rollback: bool  # the assignment's rollback command, not its deploy
    state: str
    rb_state: str | None


@dataclass
class Rollout:
    id: str
    kind: str
    state: str
    created_at: float
    updated_at: float
    finished_at: float | None
    model: str
    version: str
    bundle_url: str | None
    bundle_sha256: str | None
    bundle_size: int | None
    target: str
    waves_spec: str
    max_failure_rate: float
    wave_timeout: float
    auto_rollback: bool
    canary: str | None
    abort_reason: str | None
    rollback_on_abort: bool
    driver_pid: int | None
    driver_started: float | None
    payload: str | None = None
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)
    phase: str | None = None  # None (plain), STAGE or ACTIVATE
    activated_at: float | None = None  # when `rollout activate` started the activation

    @property
    def settled_states(self) -> frozenset[str]:
        """Non-terminal job states where a device's part in its wave is done: STAGED
        while the rollout stages."""
        return frozenset({JOB_STAGED}) if self.phase == STAGE else frozenset()

    @classmethod
    def from_row(cls, row: Any) -> Rollout:
        d = dict(row)
        d["auto_rollback"] = bool(d["auto_rollback"])
        d["rollback_on_abort"] = bool(d["rollback_on_abort"])
        d["policy"] = RolloutPolicy.from_json(d.get("policy"))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        # The payload (a trust root envelope) is what every command carries, not status.
        d = {k: v for k, v in self.__dict__.items() if k != "payload"}
        d["policy"] = self.policy.to_dict()
        return d


@dataclass
class Wave:
    idx: int
    size: int
    state: str
    started_at: float | None
    deadline: float | None
    ended_at: float | None


# A wave's SLO bake (slo_bakes.state).
BAKING = "baking"
BAKE_PASSED = "passed"
BAKE_FAILED = "failed"
BAKE_INCONCLUSIVE = "inconclusive"  # not enough data by --bake-max


@dataclass(frozen=True)
class Bake:
    wave: int
    started_at: float
    state: str  # baking | passed | failed | inconclusive
    ended_at: float | None


def is_not_judged(state: str, code: str | None) -> bool:
    """The device's gate gave no verdict (`Assignment.not_judged`)."""
    return state == JobState.FAILED.value and code == ReasonCode.NOT_JUDGED.value


def is_not_staged(state: str, code: str | None) -> bool:
    """Its `activate` found no STAGED job (`Assignment.not_staged`)."""
    return state == JobState.REJECTED.value and code == ReasonCode.NOT_STAGED.value


def is_cancel_unacknowledged(state: str, code: str | None) -> bool:
    """Its staged job's cancel went unanswered (`Assignment.cancel_unacknowledged`)."""
    return state == JobState.TIMED_OUT.value and code == CANCEL_UNACKED


def is_excused(state: str, code: str | None) -> bool:
    """Ended without a verdict on the model (`Assignment.excused`)."""
    return (
        is_not_judged(state, code)
        or is_not_staged(state, code)
        or is_cancel_unacknowledged(state, code)
    )


def counts_as_failure(state: str, code: str | None) -> bool:
    """A commanded job that ended so counts against the model (`Assignment.failed`)."""
    return state in FAILED and not is_excused(state, code)


@dataclass
class Assignment:
    rollout_id: str
    device_id: str
    wave: int
    position: int
    command_id: str | None
    envelope: bytes | None
    published_at: float | None
    state: str
    reason: str | None
    code: str | None
    last_seq: int | None
    gate: dict[str, Any] | None
    prev_version: str | None
    updated_at: float | None
    rb_command_id: str | None
    rb_envelope: bytes | None
    rb_published_at: float | None
    rb_to_version: str | None
    rb_state: str | None
    rb_reason: str | None
    rb_last_seq: int | None
    cx_command_id: str | None = None
    cx_envelope: bytes | None = None
    cx_published_at: float | None = None
    commanded_at: float | None = None
    attempts: int = 0
    retry_at: float | None = None
    ac_command_id: str | None = None  # the `activate` sent for its staged deploy
    ac_envelope: bytes | None = None
    ac_published_at: float | None = None

    @classmethod
    def from_row(cls, row: Any) -> Assignment:
        d = dict(row)
        d["gate"] = json.loads(d["gate"]) if d["gate"] else None
        return cls(**d)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def failed(self) -> bool:
        """A failure of the model on this device; one with no verdict is not (not_judged),
        nor a staged job the device no longer had when activated (not_staged)."""
        return counts_as_failure(self.state, self.code)

    @property
    def excused(self) -> bool:
        """Ended without a verdict on the model: the failure rate leaves it out."""
        return is_excused(self.state, self.code)

    @property
    def cancel_pending(self) -> bool:
        """STAGED with a cancel sent (an abort): the robot holds the staged engine until
        it answers."""
        return self.state == JOB_STAGED and self.cx_command_id is not None

    @property
    def cancel_unacknowledged(self) -> bool:
        """Its staged job's cancel went unanswered within the abort's deadline: the robot
        may still hold the staged engine (the cancel waits for it in the broker)."""
        return is_cancel_unacknowledged(self.state, self.code)

    @property
    def not_staged(self) -> bool:
        """Its `activate` found no STAGED job (it expired, stage_ttl_s, or the device lost
        it): it never switched, through no fault of the model."""
        return is_not_staged(self.state, self.code)

    @property
    def not_judged(self) -> bool:
        """The device's gate gave no verdict (its clocks or thermal state kept moving): the
        device, not the model, was the problem, so the failure rate leaves it out."""
        return is_not_judged(self.state, self.code)

    def to_dict(self) -> dict[str, Any]:
        d = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("envelope", "rb_envelope", "cx_envelope", "ac_envelope")
        }
        return d


@dataclass
class WaveSummary:
    idx: int
    size: int
    state: str
    counts: dict[str, int] = field(default_factory=dict)
    deadline: float | None = None


@dataclass
class RolloutSummary:
    rollout: Rollout
    waves: list[WaveSummary]
    assigned: int
    failed: int
    failure_rate: float
    failures: list[dict[str, Any]]
    rollbacks: dict[str, int]
    offline_pending: list[str] = field(default_factory=list)
    not_judged: list[dict[str, Any]] = field(default_factory=list)
    slo_verdicts: list[dict[str, Any]] = field(default_factory=list)
    # --offline wait|skip: offline devices the waves left to converge through the release.
    left_to_release: list[str] = field(default_factory=list)
    # --stage: devices STAGED now (the old engine serving), and those whose `activate`
    # found no staged job (not counted as failures).
    staged: list[str] = field(default_factory=list)
    not_staged: list[dict[str, Any]] = field(default_factory=list)
    # An abort of a staged rollout: STAGED devices whose cancel is not answered yet, and
    # those that did not answer it in time (they may still hold the staged engine).
    cancels_pending: list[str] = field(default_factory=list)
    cancels_unacknowledged: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "staged": self.staged,
            "not_staged": self.not_staged,
            "cancels_pending": self.cancels_pending,
            "cancels_unacknowledged": self.cancels_unacknowledged,
            "slo_verdicts": self.slo_verdicts,
            "offline_pending": self.offline_pending,
            "not_judged": self.not_judged,
            "left_to_release": self.left_to_release,
            "rollout": self.rollout.to_dict(),
            "waves": [w.__dict__ for w in self.waves],
            "assigned": self.assigned,
            "failed": self.failed,
            "failure_rate": self.failure_rate,
            "failures": self.failures,
            "rollbacks": self.rollbacks,
        }


@dataclass(frozen=True)
class StateGroup:
    """The assignments of a rollout that share wave, job state and rollback state: how
    many, how many were commanded, and the position of the first (a summary names the
    states in the order the devices first show them)."""

    wave: int
    state: str
    rb_state: str | None
    count: int
    commanded: int
    first: int


class ListedJob(NamedTuple):
    """An assignment a summary names by id: a failure, not judged, not staged, STAGED
    (its abort's cancel pending or not), a cancel unanswered, left to the release, or
    PENDING while offline."""

    device_id: str
    wave: int
    state: str
    code: str | None
    reason: str | None
    commanded: bool
    cancel_sent: bool  # an abort's cancel (cx_command_id)


def summary_from_counts(
    rollout: Rollout,
    waves: list[Wave],
    groups: list[StateGroup],
    listed: list[ListedJob],
    offline: set[str],
    slo_verdicts: list[dict[str, Any]],
) -> RolloutSummary:
    """The summary `RolloutStore.summary` folds from every assignment, from the rollout's
    state groups and the jobs it names (in position order) instead."""
    counts: dict[int, dict[str, int]] = {}
    rollbacks: dict[str, int] = {}
    for g in sorted(groups, key=lambda g: g.first):  # first seen, first named
        per_wave = counts.setdefault(g.wave, {})
        per_wave[g.state] = per_wave.get(g.state, 0) + g.count
        if g.rb_state:
            rollbacks[g.rb_state] = rollbacks.get(g.rb_state, 0) + g.count
    assigned = sum(g.commanded for g in groups)
    failed = [j for j in listed if j.commanded and counts_as_failure(j.state, j.code)]
    return RolloutSummary(
        rollout=rollout,
        waves=[
            WaveSummary(w.idx, w.size, w.state, counts.get(w.idx, {}), w.deadline) for w in waves
        ],
        assigned=assigned,
        failed=len(failed),
        failure_rate=(len(failed) / assigned) if assigned else 0.0,
        failures=[
            {
                "device_id": j.device_id,
                "wave": j.wave,
                "state": j.state,
                "code": j.code,
                "reason": j.reason,
            }
            for j in failed
        ],
        rollbacks=rollbacks,
        slo_verdicts=slo_verdicts,
        offline_pending=[
            j.device_id for j in listed if j.state == PENDING and j.device_id in offline
        ],
        not_judged=[
            {"device_id": j.device_id, "wave": j.wave, "reason": j.reason}
            for j in listed
            if j.commanded and is_not_judged(j.state, j.code)
        ],
        left_to_release=[j.device_id for j in listed if j.code == OFFLINE_CODE],
        staged=[j.device_id for j in listed if j.state == JOB_STAGED and not j.cancel_sent],
        not_staged=[
            {"device_id": j.device_id, "wave": j.wave, "reason": j.reason}
            for j in listed
            if is_not_staged(j.state, j.code)
        ],
        cancels_pending=[j.device_id for j in listed if j.state == JOB_STAGED and j.cancel_sent],
        cancels_unacknowledged=[
            {"device_id": j.device_id, "wave": j.wave, "reason": j.reason}
            for j in listed
            if is_cancel_unacknowledged(j.state, j.code)
        ],
    )


def slo_verdict_rows(
    conn: Database, *, rollout_id: str | None = None, since: float = 0.0
) -> list[dict[str, Any]]:
    """SLO verdicts with their figures and their bake's state, of one rollout or of every
    rollout judged since `since` (the Prometheus view reads these on a read-only
    connection; a database from before SLO bakes has none)."""
    if not conn.columns("slo_verdicts"):
        return []
    where = "v.at >= ?"
    params: list[Any] = [since]
    if rollout_id is not None:
        where += " AND v.rollout_id = ?"
        params.append(rollout_id)
    rows = conn.execute(
        "SELECT v.rollout_id, v.wave, v.slo, v.at, v.verdict, v.reason, v.figures, b.state "
        "FROM slo_verdicts v LEFT JOIN slo_bakes b ON b.rollout_id = v.rollout_id "
        f"AND b.wave = v.wave WHERE {where} ORDER BY v.rollout_id, v.wave, v.slo",
        params,
    ).fetchall()
    return [
        {
            "rollout_id": rid,
            "wave": w,
            "slo": slo,
            "at": at,
            "verdict": verdict,
            "reason": reason,
            "bake": bake,
            **json.loads(figures),
        }
        for rid, w, slo, at, verdict, reason, figures, bake in rows
    ]


def advances(current: str, new: str) -> bool:
    """Whether a reported job state moves an assignment forward (events may arrive late or
    twice; a terminal state is final)."""
    if current in TERMINAL:
        return False
    if new in TERMINAL:
        return True
    return _PIPELINE_ORDER.get(new, -1) > _PIPELINE_ORDER.get(current, -1)


class RolloutStore:
    # Columns added after the first release (table, column, type): NULL in older rows
    # means the behaviour from before the column (no payload, the default policy…).
    # Each one is a schema migration step after _SCHEMA (see MIGRATIONS): append only.
    _ADDED_COLUMNS = (
        ("rollouts", "payload", "TEXT"),
        ("rollouts", "policy", "TEXT"),
        ("assignments", "commanded_at", "REAL"),
        ("assignments", "attempts", "INTEGER NOT NULL DEFAULT 0"),
        ("assignments", "retry_at", "REAL"),
    )
    # Schema steps, oldest first (controller/db/migrations.py): the version of a database
    # is how many it has. A new table goes in a step of its own, appended here.
    MIGRATIONS: tuple[Step, ...] = (
        _SCHEMA,
        *(AddColumn(*c) for c in _ADDED_COLUMNS),
        _SLO_SCHEMA,
        _LEASE_SCHEMA,
        *(AddColumn(*c) for c in _STAGE_COLUMNS),
        _STAGE_INDEX,
    )

    def __init__(
        self,
        conn: Database | sqlite3.Connection,
        *,
        offline: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        """`offline`: the ids of the devices known to be offline now (the registry's
        `offline_ids`), for a summary's offline_pending."""
        self.conn = Database.wrap(conn)
        self._offline = offline
        self._lock = threading.RLock()
        migrate(self.conn, "rollouts", self.MIGRATIONS)

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT); nested calls join the outer one."""
        with self._lock, self.conn.transaction() as c:
            yield c

    # -- creation ----------------------------------------------------------------------
    def create(
        self,
        *,
        rollout_id: str,
        kind: str,
        model: str,
        version: str,
        target: str,
        waves_spec: str,
        waves: list[list[str]],
        max_failure_rate: float,
        wave_timeout: float,
        auto_rollback: bool,
        canary: str | None = None,
        bundle_url: str | None = None,
        bundle_sha256: str | None = None,
        bundle_size: int | None = None,
        prev_versions: dict[str, str | None] | None = None,
        payload: str | None = None,
        exclusive: bool = True,
        already_done: dict[str, str] | None = None,
        policy: RolloutPolicy | None = None,
        phase: str | None = None,
    ) -> Rollout:
        """Store a planned rollout. `exclusive`: refuse (DevicesHeldError, nothing stored)
        when another unfinished rollout still drives one of its devices; checked in the
        same write transaction, so two concurrent `start`s cannot both pass.
        `already_done`: device → reason for devices that need no command (they start
        SUCCEEDED, with that reason, and are never commanded). A `policy` with a
        `start_at` still to come stores the rollout SCHEDULED."""
        now = time.time()
        policy = policy or RolloutPolicy()
        state = SCHEDULED if policy.start_at is not None and policy.start_at > now else RUNNING
        prev_versions = prev_versions or {}
        already_done = already_done or {}
        with self.transaction() as c:
            if exclusive:
                held = self.holders([d for wave in waves for d in wave])
                if held:
                    raise DevicesHeldError(held)
            c.execute(
                """INSERT INTO rollouts (id, kind, state, created_at, updated_at, model, version,
                   bundle_url, bundle_sha256, bundle_size, target, waves_spec, max_failure_rate,
                   wave_timeout, auto_rollback, canary, payload, policy, phase)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    rollout_id,
                    kind,
                    state,
                    now,
                    now,
                    model,
                    version,
                    bundle_url,
                    bundle_sha256,
                    bundle_size,
                    target,
                    waves_spec,
                    max_failure_rate,
                    wave_timeout,
                    int(auto_rollback),
                    canary,
                    payload,
                    policy.to_json(),
                    phase,
                ),
            )
            position = 0
            for idx, devices in enumerate(waves):
                c.execute(
                    "INSERT INTO waves (rollout_id, idx, size, state) VALUES (?, ?, ?, 'pending')",
                    (rollout_id, idx, len(devices)),
                )
                for device in devices:
                    c.execute(
                        """INSERT INTO assignments (rollout_id, device_id, wave, position, state,
                           reason, prev_version, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                        (
                            rollout_id,
                            device,
                            idx,
                            position,
                            JobState.SUCCEEDED.value if device in already_done else WAITING,
                            already_done.get(device),
                            prev_versions.get(device),
                            now,
                        ),
                    )
                    position += 1
        rollout = self.get(rollout_id)
        assert rollout is not None
        return rollout

    # -- reads -------------------------------------------------------------------------
    def holders(self, device_ids: list[str]) -> dict[str, str]:
        """Device id → id of the unfinished rollout (running, paused or aborting) in which
        that device has not reached a terminal state (its deploy, or the rollback an
        abort sent it). Devices not held are absent."""
        wanted = set(device_ids)
        states = ",".join("?" for _ in UNFINISHED)
        terminal = ",".join("?" for _ in TERMINAL)
        with self._lock:
            rows = self.conn.execute(
                f"SELECT a.device_id, a.rollout_id FROM assignments a "
                f"JOIN rollouts r ON r.id = a.rollout_id "
                f"WHERE r.state IN ({states}) AND (a.state NOT IN ({terminal}) OR "
                f"(a.rb_command_id IS NOT NULL AND COALESCE(a.rb_state, ?) NOT IN ({terminal}))) "
                f"ORDER BY r.created_at",
                (*sorted(UNFINISHED), *sorted(TERMINAL), PENDING, *sorted(TERMINAL)),
            ).fetchall()
        held: dict[str, str] = {}
        for device_id, rollout_id in rows:
            if device_id in wanted:
                held.setdefault(device_id, rollout_id)
        return held

    def get(self, rollout_id: str) -> Rollout | None:
        with self._lock:
            row = self.conn.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        return Rollout.from_row(row) if row else None

    def find(self, prefix: str) -> Rollout | None:
        """By full id or a unique prefix (operators type the first few characters)."""
        exact = self.get(prefix)
        if exact:
            return exact
        with self._lock:
            rows = self.conn.execute(
                "SELECT * FROM rollouts WHERE id LIKE ? LIMIT 2", (prefix.replace("%", "") + "%",)
            ).fetchall()
        return Rollout.from_row(rows[0]) if len(rows) == 1 else None

    def recent(self, limit: int = 50) -> list[Rollout]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT * FROM rollouts ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [Rollout.from_row(r) for r in rows]

    def waves(self, rollout_id: str) -> list[Wave]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT idx, size, state, started_at, deadline, ended_at FROM waves "
                "WHERE rollout_id=? ORDER BY idx",
                (rollout_id,),
            ).fetchall()
        return [Wave(**dict(r)) for r in rows]

    def assignments(self, rollout_id: str, wave: int | None = None) -> list[Assignment]:
        sql = "SELECT * FROM assignments WHERE rollout_id=?"
        args: tuple[Any, ...] = (rollout_id,)
        if wave is not None:
            sql += " AND wave=?"
            args = (rollout_id, wave)
        with self._lock:
            rows = self.conn.execute(sql + " ORDER BY position", args).fetchall()
        return [Assignment.from_row(r) for r in rows]

    def device_rows(self, rollout_id: str, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """What a page shows of the rollout's devices: every one in wave order when they
        are at most `limit`, else the `limit` that changed last, newest first (the
        database picks them: no row of the others is read into Python). The flag says
        whether that is all of them."""
        columns = ("device_id", "wave", "state", "code", "reason", "gate", "rb_state")
        with self._lock:
            rows = self.conn.execute(
                f"SELECT {', '.join(columns)}, updated_at, position FROM assignments "
                "WHERE rollout_id=? ORDER BY COALESCE(updated_at, 0) DESC, position LIMIT ?",
                (rollout_id, limit + 1),
            ).fetchall()
        everyone = len(rows) <= limit
        if everyone:
            rows = sorted(rows, key=lambda r: r[-1])
        out = []
        for r in rows[:limit]:
            d = dict(zip((*columns, "updated_at"), r[:-1], strict=True))
            d["gate"] = json.loads(d["gate"]) if d["gate"] else None
            out.append(d)
        return out, everyone

    def device_history(self, device_id: str, limit: int = 20) -> list[tuple[Rollout, Assignment]]:
        """The device's jobs across rollouts, newest first."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT a.* FROM assignments a JOIN rollouts r ON r.id = a.rollout_id "
                "WHERE a.device_id=? ORDER BY r.created_at DESC LIMIT ?",
                (device_id, limit),
            ).fetchall()
        out = []
        for row in rows:
            a = Assignment.from_row(row)
            r = self.get(a.rollout_id)
            if r is not None:
                out.append((r, a))
        return out

    def assignment(self, rollout_id: str, device_id: str) -> Assignment | None:
        with self._lock:
            row = self.conn.execute(
                "SELECT * FROM assignments WHERE rollout_id=? AND device_id=?",
                (rollout_id, device_id),
            ).fetchone()
        return Assignment.from_row(row) if row else None

    def assignment_by_command(self, command_id: str) -> tuple[Assignment, bool] | None:
        """The assignment a command belongs to, and whether it is its rollback command."""
        with self._lock:
            row = self.conn.execute(
                "SELECT * FROM assignments WHERE command_id=? OR rb_command_id=?",
                (command_id, command_id),
            ).fetchone()
        if row is None:
            return None
        a = Assignment.from_row(row)
        return a, a.rb_command_id == command_id

    def summary(self, rollout_id: str) -> RolloutSummary:
        """Every assignment of the rollout loaded and folded: O(devices) rows and objects.
        The reference `light_summary` is tested and benchmarked against
        (bench/rollout_view.py); views use that one."""
        rollout = self.get(rollout_id)
        if rollout is None:
            raise KeyError(rollout_id)
        assignments = self.assignments(rollout_id)
        waves = []
        for w in self.waves(rollout_id):
            counts: dict[str, int] = {}
            for a in assignments:
                if a.wave == w.idx:
                    counts[a.state] = counts.get(a.state, 0) + 1
            waves.append(WaveSummary(w.idx, w.size, w.state, counts, w.deadline))
        assigned = [a for a in assignments if a.command_id is not None]
        failed = [a for a in assigned if a.failed]
        # Commanded devices that are offline, whose commands wait in the broker: the
        # registry knows who is offline (its tables are its own).
        offline = set(self._offline()) if self._offline is not None else set()
        rollbacks: dict[str, int] = {}
        for a in assignments:
            if a.rb_state:
                rollbacks[a.rb_state] = rollbacks.get(a.rb_state, 0) + 1
        return RolloutSummary(
            rollout=rollout,
            waves=waves,
            assigned=len(assigned),
            failed=len(failed),
            failure_rate=(len(failed) / len(assigned)) if assigned else 0.0,
            failures=[
                {
                    "device_id": a.device_id,
                    "wave": a.wave,
                    "state": a.state,
                    "code": a.code,
                    "reason": a.reason,
                }
                for a in failed
            ],
            rollbacks=rollbacks,
            slo_verdicts=self.slo_verdicts(rollout_id),
            offline_pending=[
                a.device_id for a in assignments if a.state == PENDING and a.device_id in offline
            ],
            not_judged=[
                {"device_id": a.device_id, "wave": a.wave, "reason": a.reason}
                for a in assigned
                if a.not_judged
            ],
            left_to_release=[a.device_id for a in assignments if a.code == OFFLINE_CODE],
            staged=[
                a.device_id for a in assignments if a.state == JOB_STAGED and not a.cancel_pending
            ],
            not_staged=[
                {"device_id": a.device_id, "wave": a.wave, "reason": a.reason}
                for a in assignments
                if a.not_staged
            ],
            cancels_pending=[a.device_id for a in assignments if a.cancel_pending],
            cancels_unacknowledged=[
                {"device_id": a.device_id, "wave": a.wave, "reason": a.reason}
                for a in assignments
                if a.cancel_unacknowledged
            ],
        )

    def light_summary(self, rollout_id: str) -> RolloutSummary:
        """`summary` without loading every assignment: the database counts them (GROUP BY
        wave and state) and returns rows only for the devices a summary names (failures,
        not judged, not staged, STAGED, cancels unanswered, left to the release; PENDING
        ones only while some device is offline). Equal to `summary`, at a fraction of its
        cost on a big rollout: what the live view redraws and what status and lists show.
        Its reads share one snapshot: the counts and the named devices agree while a
        driver writes."""
        with self._lock, self.conn.snapshot():
            rollout = self.get(rollout_id)
            if rollout is None:
                raise KeyError(rollout_id)
            offline = set(self._offline()) if self._offline is not None else set()
            groups, listed = self._tally(rollout_id, name_pending=bool(offline))
            waves, slo = self.waves(rollout_id), self.slo_verdicts(rollout_id)
        return summary_from_counts(rollout, waves, groups, listed, offline, slo)

    def _tally(
        self, rollout_id: str, *, name_pending: bool
    ) -> tuple[list[StateGroup], list[ListedJob]]:
        """The rollout's state groups and the jobs a summary may name, in one pass over its
        assignments: a job in a failure state, STAGED, code offline (PENDING too, with
        `name_pending`) is a group of its own, keyed by its device id."""
        states = sorted(FAILED | {JOB_STAGED} | ({PENDING} if name_pending else set()))
        marks = ",".join("?" for _ in states)
        with self._lock:
            rows = self.conn.execute(
                "SELECT wave, state, rb_state, "
                f"CASE WHEN state IN ({marks}) OR code=? THEN device_id END, COUNT(*), "
                "SUM(CASE WHEN command_id IS NULL THEN 0 ELSE 1 END), MIN(position), "
                "MAX(code), MAX(reason), MAX(CASE WHEN cx_command_id IS NULL THEN 0 ELSE 1 END) "
                "FROM assignments WHERE rollout_id=? "
                "GROUP BY 1, 2, 3, 4",
                (*states, OFFLINE_CODE, rollout_id),
            ).fetchall()
        # int(): PostgreSQL's SUM of a bigint is a numeric (a Decimal here).
        groups = [StateGroup(r[0], r[1], r[2], int(r[4]), int(r[5]), int(r[6])) for r in rows]
        named = sorted((r for r in rows if r[3] is not None), key=lambda r: r[6])
        return groups, [
            ListedJob(r[3], r[0], r[1], r[7], r[8], bool(r[5]), bool(r[9])) for r in named
        ]

    # -- writes ------------------------------------------------------------------------
    def set_state(self, rollout_id: str, state: str, *, abort_reason: str | None = None) -> None:
        now = time.time()
        with self.transaction() as c:
            c.execute(
                "UPDATE rollouts SET state=?, updated_at=?, "
                "abort_reason=COALESCE(?, abort_reason), "
                "finished_at=CASE WHEN ? IN ('succeeded','aborted') THEN ? ELSE finished_at END "
                "WHERE id=?",
                (state, now, abort_reason, state, now, rollout_id),
            )

    def transition(self, rollout_id: str, from_state: str, to_state: str) -> bool:
        """Move the rollout to `to_state` only if it is still in `from_state` (an operator's
        abort or pause in between wins)."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE rollouts SET state=?, updated_at=? WHERE id=? AND state=?",
                (to_state, time.time(), rollout_id, from_state),
            )
            return cur.rowcount == 1

    def request_abort(self, rollout_id: str, reason: str, rollback: bool) -> bool:
        """Mark an unfinished rollout for abort; False if it had already finished."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE rollouts SET state=?, abort_reason=?, rollback_on_abort=?, updated_at=? "
                "WHERE id=? AND state NOT IN ('succeeded','aborted')",
                (ABORTING, reason, int(rollback), time.time(), rollout_id),
            )
            return cur.rowcount == 1

    # -- driver leases (controller/rollouts/lease.py decides, this stores) -------------------
    def lease(self, rollout_id: str) -> Lease | None:
        with self._lock:
            row = self.conn.execute(
                f"SELECT rollout_id, holder, host, pid, pid_started, "
                f"expires_at - {self.conn.now_sql} FROM driver_leases WHERE rollout_id=?",
                (rollout_id,),
            ).fetchone()
        return Lease(*row) if row else None

    def take_lease(
        self,
        rollout_id: str,
        holder: tuple[str, str, int, float],
        ttl_s: float,
        *,
        replacing: str | None = None,
    ) -> Lease:
        """Take the rollout's lease for `holder` (id, host, pid, pid start) if nobody
        holds it, it expired, it is already ours, or its holder is `replacing` (one the
        caller saw die). Returns the lease as it is then: ours, or the live one in the
        way. One write transaction: two takers cannot both win."""
        holder_id, host, pid, started = holder
        now = self.conn.now_sql
        with self.transaction() as c:
            current = self.lease(rollout_id)
            if (
                current is not None
                and current.live
                and current.holder
                not in (
                    holder_id,
                    replacing,
                )
            ):
                return current
            c.execute(
                f"INSERT INTO driver_leases (rollout_id, holder, host, pid, pid_started, "
                f"acquired_at, expires_at) VALUES (?, ?, ?, ?, ?, {now}, {now} + ?) "
                "ON CONFLICT (rollout_id) DO UPDATE SET holder=excluded.holder, "
                "host=excluded.host, pid=excluded.pid, pid_started=excluded.pid_started, "
                "acquired_at=excluded.acquired_at, expires_at=excluded.expires_at",
                (rollout_id, holder_id, host, pid, started, ttl_s),
            )
            c.execute(
                "UPDATE rollouts SET driver_pid=?, driver_started=? WHERE id=?",
                (pid, started, rollout_id),
            )
            taken = self.lease(rollout_id)
        assert taken is not None
        return taken

    def renew_lease(self, rollout_id: str, holder_id: str, ttl_s: float) -> bool:
        """Push the expiry of our lease on; False when another holder has taken it (an
        expired lease nobody took is still ours)."""
        with self.transaction() as c:
            cur = c.execute(
                f"UPDATE driver_leases SET expires_at = {self.conn.now_sql} + ? "
                "WHERE rollout_id=? AND holder=?",
                (ttl_s, rollout_id, holder_id),
            )
            return cur.rowcount == 1

    def holds_lease(self, rollout_id: str, holder_id: str) -> bool:
        """Inside the write transaction that records a command: whether `holder_id` still
        holds the lease (every taker writes in such a transaction, so this cannot go stale
        before the commit)."""
        row = self.conn.execute(
            "SELECT holder FROM driver_leases WHERE rollout_id=?", (rollout_id,)
        ).fetchone()
        return row is not None and row[0] == holder_id

    def drop_lease(self, rollout_id: str, holder_id: str) -> None:
        """Give the lease up (only ours: a lease someone took over stays theirs)."""
        with self.transaction() as c:
            cur = c.execute(
                "DELETE FROM driver_leases WHERE rollout_id=? AND holder=?",
                (rollout_id, holder_id),
            )
            if cur.rowcount:
                c.execute(
                    "UPDATE rollouts SET driver_pid=NULL, driver_started=NULL WHERE id=?",
                    (rollout_id,),
                )

    def add_rollback_wave(self, rollout_id: str, size: int, deadline: float) -> int:
        """The rollback phase as a pseudo-wave after the last one; returns its index."""
        with self.transaction() as c:
            row = c.execute(
                "SELECT COUNT(*) FROM waves WHERE rollout_id=?", (rollout_id,)
            ).fetchone()
            idx = int(row[0])
            c.execute(
                "INSERT INTO waves (rollout_id, idx, size, state, started_at, deadline) "
                "VALUES (?, ?, ?, 'rollback', ?, ?)",
                (rollout_id, idx, size, time.time(), deadline),
            )
        return idx

    def skip_pending_waves(self, rollout_id: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE waves SET state='skipped' WHERE rollout_id=? AND state='pending'",
                (rollout_id,),
            )

    def start_wave(self, rollout_id: str, idx: int, deadline: float) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE waves SET state='running', started_at=?, deadline=? "
                "WHERE rollout_id=? AND idx=? AND state='pending'",
                (time.time(), deadline, rollout_id, idx),
            )

    # -- SLO bakes (controller/rollouts/slo.py judges, the driver records) -------------------------
    def bake(self, rollout_id: str, wave: int) -> Bake | None:
        row = self.conn.execute(
            "SELECT wave, started_at, state, ended_at FROM slo_bakes WHERE rollout_id=? AND wave=?",
            (rollout_id, wave),
        ).fetchone()
        return Bake(*row) if row else None

    def start_bake(self, rollout_id: str, wave: int, at: float) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO slo_bakes (rollout_id, wave, started_at, state) "
                "VALUES (?, ?, ?, 'baking') ON CONFLICT(rollout_id, wave) DO NOTHING",
                (rollout_id, wave, at),
            )

    def end_bake(self, rollout_id: str, wave: int, state: str, at: float) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE slo_bakes SET state=?, ended_at=? WHERE rollout_id=? AND wave=?",
                (state, at, rollout_id, wave),
            )

    def record_verdicts(
        self, rollout_id: str, wave: int, verdicts: list[dict[str, Any]], at: float
    ) -> None:
        """The latest judgement of each SLO of a wave, with its figures."""
        with self.transaction() as c:
            for v in verdicts:
                figures = {k: x for k, x in v.items() if k not in ("slo", "verdict", "reason")}
                c.execute(
                    "INSERT INTO slo_verdicts (rollout_id, wave, slo, at, verdict, reason, "
                    "figures) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(rollout_id, wave, slo) "
                    "DO UPDATE SET at=excluded.at, verdict=excluded.verdict, "
                    "reason=excluded.reason, figures=excluded.figures",
                    (
                        rollout_id,
                        wave,
                        v["slo"],
                        at,
                        v["verdict"],
                        v["reason"],
                        json.dumps(figures),
                    ),
                )

    def slo_verdicts(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every wave's SLO verdicts, with the bake's state: wave order, then SLO order."""
        return slo_verdict_rows(self.conn, rollout_id=rollout_id)

    def end_wave(self, rollout_id: str, idx: int, state: str = "done") -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE waves SET state=?, ended_at=? WHERE rollout_id=? AND idx=?",
                (state, time.time(), rollout_id, idx),
            )

    def record_command(
        self,
        rollout_id: str,
        device_id: str,
        command_id: str,
        envelope: bytes,
        *,
        at: float | None = None,
    ) -> bool:
        """Attach the signed command to a device's assignment, once: False (and nothing
        changes) if the assignment already has one. `at`: when it was released (the
        driver's clock), what --max-per-minute paces against, across restarts."""
        now = time.time()
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE assignments SET command_id=?, envelope=?, state=?, updated_at=?, "
                "commanded_at=? WHERE rollout_id=? AND device_id=? AND command_id IS NULL",
                (command_id, envelope, PENDING, now, at or now, rollout_id, device_id),
            )
            return cur.rowcount == 1

    def reset_for_retry(
        self, rollout_id: str, device_id: str, command_id: str, retry_at: float, reason: str
    ) -> bool:
        """Make a failed assignment wait for a new command (`retry_at` on): its failed
        command is forgotten (a late event of it no longer counts), its cancel too (an
        abort may cancel the new one). Only while it still holds `command_id`."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE assignments SET command_id=NULL, envelope=NULL, published_at=NULL, "
                "cx_command_id=NULL, cx_envelope=NULL, cx_published_at=NULL, state=?, "
                "reason=?, code=NULL, last_seq=NULL, attempts=attempts+1, retry_at=?, "
                "updated_at=? WHERE rollout_id=? AND device_id=? AND command_id=?",
                (WAITING, reason, retry_at, time.time(), rollout_id, device_id, command_id),
            )
            return cur.rowcount == 1

    def last_commanded_at(self, rollout_id: str) -> float | None:
        """When the rollout last released a deploy command (None: never)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT MAX(commanded_at) FROM assignments WHERE rollout_id=?", (rollout_id,)
            ).fetchone()
        return row[0] if row else None

    def extend_deadline(self, rollout_id: str, idx: int, deadline: float) -> None:
        """A paced wave's deadline counts from its last released command."""
        with self.transaction() as c:
            c.execute(
                "UPDATE waves SET deadline="
                "CASE WHEN COALESCE(deadline, 0) > ? THEN deadline ELSE ? END "
                "WHERE rollout_id=? AND idx=?",
                (deadline, deadline, rollout_id, idx),
            )

    # -- staged activation -------------------------------------------------------------
    def start_activation(
        self,
        rollout_id: str,
        waves: list[list[str]],
        *,
        waves_spec: str,
        max_failure_rate: float,
        wave_timeout: float,
        auto_rollback: bool,
        policy: RolloutPolicy,
        at: float,
    ) -> bool:
        """A staged rollout becomes the activation of its STAGED devices: its stage waves
        are kept (state `staged`), the activation's waves follow them and the devices move
        into those; the plan and policy given replace the stage's. Only from `staged`
        (False otherwise: an abort or another activate won); one transaction."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE rollouts SET state=?, phase=?, activated_at=?, waves_spec=?, "
                "max_failure_rate=?, wave_timeout=?, auto_rollback=?, policy=?, updated_at=? "
                "WHERE id=? AND state=?",
                (RUNNING, ACTIVATE, at, waves_spec, max_failure_rate, wave_timeout,
                 int(auto_rollback), policy.to_json(), time.time(), rollout_id, STAGED),
            )  # fmt: skip
            if cur.rowcount != 1:
                return False
            c.execute(
                "UPDATE waves SET state=? WHERE rollout_id=? AND state='done'",
                (STAGED, rollout_id),
            )
            row = c.execute(
                "SELECT COUNT(*) FROM waves WHERE rollout_id=?", (rollout_id,)
            ).fetchone()
            first = int(row[0])
            for k, devices in enumerate(waves):
                c.execute(
                    "INSERT INTO waves (rollout_id, idx, size, state) VALUES (?, ?, ?, 'pending')",
                    (rollout_id, first + k, len(devices)),
                )
                c.executemany(
                    "UPDATE assignments SET wave=? WHERE rollout_id=? AND device_id=?",
                    [(first + k, rollout_id, d) for d in devices],
                )
        return True

    def record_activate(
        self, rollout_id: str, device_id: str, command_id: str, envelope: bytes, *, at: float
    ) -> bool:
        """Attach the signed `activate` to a STAGED device's assignment, once (False and
        nothing changes otherwise). `at`: its release time (--max-per-minute)."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE assignments SET ac_command_id=?, ac_envelope=?, commanded_at=?, "
                "updated_at=? WHERE rollout_id=? AND device_id=? AND ac_command_id IS NULL "
                "AND state=?",
                (command_id, envelope, at, time.time(), rollout_id, device_id, JOB_STAGED),
            )
            return cur.rowcount == 1

    def activate_owner(self, command_id: str) -> tuple[str, str] | None:
        """(rollout id, device id) of an `activate` command we sent."""
        with self._lock:
            row = self.conn.execute(
                "SELECT rollout_id, device_id FROM assignments WHERE ac_command_id=?",
                (command_id,),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def activate_envelope(self, command_id: str) -> bytes | None:
        with self._lock:
            row = self.conn.execute(
                "SELECT ac_envelope FROM assignments WHERE ac_command_id=?", (command_id,)
            ).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def settle_activate(
        self, command_id: str, state: str, *, code: str | None, reason: str | None
    ) -> bool:
        """The device refused our `activate` (code not_staged: no staged job any more;
        or the command itself): its assignment, still STAGED, ends so. A device whose
        job already moved on reports for itself."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE assignments SET state=?, code=?, reason=?, updated_at=? "
                "WHERE ac_command_id=? AND state=?",
                (state, code, reason, time.time(), command_id, JOB_STAGED),
            )
            return cur.rowcount == 1

    def record_rollback(
        self, rollout_id: str, device_id: str, command_id: str, envelope: bytes, to_version: str
    ) -> bool:
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE assignments SET rb_command_id=?, rb_envelope=?, rb_to_version=?, "
                "rb_state=?, updated_at=? "
                "WHERE rollout_id=? AND device_id=? AND rb_command_id IS NULL",
                (command_id, envelope, to_version, PENDING, time.time(), rollout_id, device_id),
            )
            return cur.rowcount == 1

    def record_cancel(
        self, rollout_id: str, device_id: str, command_id: str, envelope: bytes
    ) -> bool:
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE assignments SET cx_command_id=?, cx_envelope=?, updated_at=? "
                "WHERE rollout_id=? AND device_id=? AND cx_command_id IS NULL",
                (command_id, envelope, time.time(), rollout_id, device_id),
            )
            return cur.rowcount == 1

    def mark_rollback_impossible(self, rollout_id: str, device_id: str, reason: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE assignments SET rb_state=?, rb_reason=? WHERE rollout_id=? AND device_id=?",
                (NO_PREVIOUS, reason, rollout_id, device_id),
            )

    def mark_published(
        self,
        command_ids: list[str],
        *,
        rollback: bool = False,
        cancel: bool = False,
        activate: bool = False,
    ) -> None:
        column, key = ("published_at", "command_id")
        if rollback:
            column, key = "rb_published_at", "rb_command_id"
        if cancel:
            column, key = "cx_published_at", "cx_command_id"
        if activate:
            column, key = "ac_published_at", "ac_command_id"
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                f"UPDATE assignments SET {column}=? WHERE {key}=? AND {column} IS NULL",
                [(now, cid) for cid in command_ids],
            )

    def advance_job(
        self,
        command_id: str,
        state: str,
        *,
        device_id: str,
        seq: int | None = None,
        reason: str | None = None,
        code: str | None = None,
        gate: dict[str, Any] | None = None,
    ) -> tuple[str, str] | None:
        """The common case of `apply_job_state` in one statement: the deploy command
        `command_id` of `device_id` moves to `state` if that is progress. Returns (rollout
        id, device id) when it moved; None when it did not (not a deploy command of ours,
        another device's, not progress): the caller then asks `job` and `apply_job_state`,
        which settle the rest (rollback commands, repeats) exactly as before."""
        step = JobStep(command_id, state, device_id, seq, reason, code, gate)
        return self.advance_jobs([step])[0]

    def advance_jobs(self, steps: Sequence[JobStep]) -> list[tuple[str, str] | None]:
        """`advance_job` for each step, in order, in one batch (one round trip on
        PostgreSQL): what each returned."""
        now = time.time()
        terminal = sorted(TERMINAL)
        with self.transaction() as c:
            rows = c.execute_each(
                _ADVANCE_SQL,
                [
                    (
                        s.state, s.reason, s.code, s.seq,
                        json.dumps(s.gate) if s.gate else None, now,
                        s.command_id, s.device_id, *terminal,
                        1 if s.state in TERMINAL else 0, _PIPELINE_ORDER.get(s.state, -1),
                    )
                    for s in steps
                ],
            )  # fmt: skip
        return [(r[0], r[1]) if r else None for r in rows]

    def deploy_commands(self, rollout_id: str) -> dict[str, str]:
        """The rollout's deploy command ids so far -> their device ids."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT command_id, device_id FROM assignments "
                "WHERE rollout_id=? AND command_id IS NOT NULL",
                (rollout_id,),
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def job(self, command_id: str) -> JobRow | None:
        """Where a deploy or rollback command we sent stands: one indexed read, what an
        event needs to find its owner and whether it is progress."""
        with self._lock:
            row = self.conn.execute(
                "SELECT rollout_id, device_id, command_id, state, rb_state FROM assignments "
                "WHERE command_id=? OR rb_command_id=?",
                (command_id, command_id),
            ).fetchone()
        if row is None:
            return None
        return JobRow(row[0], row[1], command_id, row[2] != command_id, row[3], row[4])

    def apply_job_state(
        self,
        command_id: str,
        state: str,
        *,
        seq: int | None = None,
        reason: str | None = None,
        code: str | None = None,
        gate: dict[str, Any] | None = None,
        device_id: str | None = None,
        only_from: str | None = None,
        known: JobRow | None = None,
    ) -> bool:
        """Move the assignment of `command_id` (deploy or rollback) to `state` if that is
        progress (and, with `only_from`, only from that state); True when it changed.
        `known`: `job(command_id)` as the caller just read it in this transaction (an
        event's owner check), so it is not read twice."""
        row = known if known is not None and known.command_id == command_id else None
        row = row or self.job(command_id)
        if row is None:
            return False
        if device_id is not None and device_id != row.device_id:
            return False  # a device reporting on another device's command: not ours to trust
        is_rollback = row.is_rollback
        current = (row.rb_state or PENDING) if is_rollback else row.state
        if only_from is not None and current != only_from:
            return False
        if not advances(current, state):
            return False
        now = time.time()
        with self.transaction() as c:
            if is_rollback:
                c.execute(
                    "UPDATE assignments SET rb_state=?, rb_reason=?, rb_last_seq=?, updated_at=? "
                    "WHERE rb_command_id=?",
                    (state, reason, seq, now, command_id),
                )
            else:
                c.execute(
                    "UPDATE assignments SET state=?, reason=?, code=?, last_seq=?, "
                    "gate=COALESCE(?, gate), updated_at=? WHERE command_id=?",
                    (state, reason, code, seq, json.dumps(gate) if gate else None, now, command_id),
                )
        return True

    def sent_envelope(self, command_id: str) -> bytes | None:
        """The signed bytes of the deploy or rollback command `command_id` we sent."""
        with self._lock:
            row = self.conn.execute(
                "SELECT CASE WHEN command_id=? THEN envelope ELSE rb_envelope END "
                "FROM assignments WHERE command_id=? OR rb_command_id=?",
                (command_id, command_id, command_id),
            ).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def command_owner(self, command_id: str) -> tuple[str, str] | None:
        """(rollout id, device id) of a deploy or rollback command we sent."""
        with self._lock:
            row = self.conn.execute(
                "SELECT rollout_id, device_id FROM assignments WHERE command_id=? "
                "OR rb_command_id=?",
                (command_id, command_id),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def unreleased(self, rollout_id: str, wave: int) -> bool:
        """Whether devices of the wave still wait for their command (WAITING, none sent)."""
        with self._lock:
            row = self.conn.execute(
                "SELECT 1 FROM assignments WHERE rollout_id=? AND wave=? "
                "AND command_id IS NULL AND state=? LIMIT 1",
                (rollout_id, wave, WAITING),
            ).fetchone()
        return row is not None

    def rollbacks_open(self, rollout_id: str) -> tuple[int, int]:
        """(rollback commands sent, of which not yet in a terminal state)."""
        placeholders = ",".join("?" for _ in TERMINAL)
        with self._lock:
            row = self.conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN COALESCE(rb_state, ?) NOT IN "
                f"({placeholders}) THEN 1 ELSE 0 END), 0) FROM assignments "
                f"WHERE rollout_id=? AND rb_command_id IS NOT NULL",
                (PENDING, *sorted(TERMINAL), rollout_id),
            ).fetchone()
        return int(row[0]), int(row[1])

    def staged_cancels_open(self, rollout_id: str) -> int:
        """STAGED devices whose cancel (an abort's) is not answered yet: one count in SQL,
        what the abort's last phase waits for on each tick."""
        with self._lock:
            row = self.conn.execute(
                "SELECT COUNT(*) FROM assignments WHERE rollout_id=? AND state=? "
                "AND cx_command_id IS NOT NULL",
                (rollout_id, JOB_STAGED),
            ).fetchone()
        return int(row[0])

    def staged_cancels_pending(self, rollout_id: str) -> list[str]:
        """The ids of the devices `staged_cancels_open` counts."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT device_id FROM assignments WHERE rollout_id=? AND state=? "
                "AND cx_command_id IS NOT NULL ORDER BY position",
                (rollout_id, JOB_STAGED),
            ).fetchall()
        return [r[0] for r in rows]

    def time_out_staged_cancels(self, rollout_id: str, reasons: dict[str, str]) -> list[str]:
        """The abort's deadline passed: each device of `reasons` whose staged job's cancel
        is still unanswered ends TIMED_OUT, code CANCEL_UNACKED, with its reason (one that
        answered meanwhile keeps its end). Returns those timed out."""
        now = time.time()
        with self.transaction() as c:
            still = set(self.staged_cancels_pending(rollout_id))
            late = [d for d in reasons if d in still]
            c.executemany(
                "UPDATE assignments SET state=?, reason=?, code=?, updated_at=? "
                "WHERE rollout_id=? AND device_id=? AND state=?",
                [
                    (JobState.TIMED_OUT.value, reasons[d], CANCEL_UNACKED, now, rollout_id, d,
                     JOB_STAGED)
                    for d in late
                ],
            )  # fmt: skip
        return late

    def cancel_owner(self, command_id: str) -> tuple[str, str] | None:
        """(rollout id, device id) of a cancel command we sent."""
        with self._lock:
            row = self.conn.execute(
                "SELECT rollout_id, device_id FROM assignments WHERE cx_command_id=?",
                (command_id,),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def settle_staged_cancel(self, command_id: str, *, code: str | None, reason: str) -> bool:
        """The device answered our cancel `command_id` of a job we still know as STAGED
        and never sent an `activate` (one that was may be switching: it reports for
        itself): it ends CANCELED, its staged engine gone or never to switch in. True
        when it changed."""
        with self.transaction() as c:
            cur = c.execute(
                "UPDATE assignments SET state=?, code=?, reason=?, updated_at=? "
                "WHERE cx_command_id=? AND state=? AND ac_command_id IS NULL",
                (JobState.CANCELED.value, code, reason, time.time(), command_id, JOB_STAGED),
            )
            return cur.rowcount == 1

    def open_count(self, rollout_id: str, wave: int, settled: frozenset[str] = frozenset()) -> int:
        """Commanded devices of the wave not yet in a terminal state, nor in one of
        `settled` (a paced wave's devices still waiting for their command are the
        driver's to count)."""
        done = sorted(TERMINAL | settled)
        placeholders = ",".join("?" for _ in done)
        with self._lock:
            return int(
                self.conn.execute(
                    f"SELECT COUNT(*) FROM assignments WHERE rollout_id=? AND wave=? "
                    f"AND command_id IS NOT NULL AND state NOT IN ({placeholders})",
                    (rollout_id, wave, *done),
                ).fetchone()[0]
            )

    def held_count(self, rollout_id: str, wave: int) -> int:
        """Devices of the wave ON_HOLD: gated, waiting for their window or busy lock."""
        with self._lock:
            return int(
                self.conn.execute(
                    "SELECT COUNT(*) FROM assignments WHERE rollout_id=? AND wave=? AND state=?",
                    (rollout_id, wave, ON_HOLD),
                ).fetchone()[0]
            )

    def time_out(
        self,
        rollout_id: str,
        wave: int,
        reason: str,
        *,
        only_silent: str | None = None,
        settled: frozenset[str] = frozenset(),
    ) -> list[str]:
        """Every unfinished, commanded device of the wave becomes TIMED_OUT (with
        `only_silent`, only those still in that state: they never answered their
        command), but one ON_HOLD (its wait is bounded on the device: its windows,
        busy_timeout_s) or in one of `settled` (done with its wave: STAGED)."""
        spared = sorted(TERMINAL | settled | {ON_HOLD})
        placeholders = ",".join("?" for _ in spared)
        silent = " AND state=?" if only_silent else ""
        with self.transaction() as c:
            rows = c.execute(
                f"SELECT device_id FROM assignments WHERE rollout_id=? AND wave=? "
                f"AND command_id IS NOT NULL AND state NOT IN ({placeholders}){silent}",
                (rollout_id, wave, *spared, *((only_silent,) if only_silent else ())),
            ).fetchall()
            ids = [r["device_id"] for r in rows]
            c.executemany(
                "UPDATE assignments SET state=?, reason=?, code=?, updated_at=? "
                "WHERE rollout_id=? AND device_id=?",
                [
                    (JobState.TIMED_OUT.value, reason, "timed_out", time.time(), rollout_id, d)
                    for d in ids
                ],
            )
        return ids

    def leave_to_release(self, rollout_id: str, device_ids: list[str], reason: str) -> None:
        """--offline wait|skip: offline devices end CANCELED (not a failure), code
        `offline`: they converge through the release the rollout sets when it completes."""
        with self.transaction() as c:
            c.executemany(
                "UPDATE assignments SET state=?, reason=?, code=?, updated_at=? "
                "WHERE rollout_id=? AND device_id=?",
                [
                    (JobState.CANCELED.value, reason, OFFLINE_CODE, time.time(), rollout_id, d)
                    for d in device_ids
                ],
            )

    def time_out_stuck(
        self, rollout_id: str, wave: int, before: float, limit_s: float
    ) -> list[str]:
        """--device-timeout: devices of the wave whose job reported a state and has not
        moved since `before` become TIMED_OUT (PENDING is not a job state: a device that
        has not received its command yet is the wave timeout's to judge, and so is STAGED:
        parked by design, or not yet moved by its activate; ON_HOLD waits by design,
        bounded on the device)."""
        placeholders = ",".join("?" for _ in TERMINAL)
        now = time.time()
        with self.transaction() as c:
            rows = c.execute(
                f"SELECT device_id, state FROM assignments WHERE rollout_id=? AND wave=? "
                f"AND command_id IS NOT NULL AND state NOT IN ({placeholders}) "
                f"AND state NOT IN (?, ?, ?) AND updated_at < ?",
                (rollout_id, wave, *TERMINAL, PENDING, ON_HOLD, JOB_STAGED, before),
            ).fetchall()
            c.executemany(
                "UPDATE assignments SET state=?, reason=?, code=?, updated_at=? "
                "WHERE rollout_id=? AND device_id=?",
                [
                    (
                        JobState.TIMED_OUT.value,
                        f"stuck in {r['state']} for more than {limit_s:g}s (--device-timeout)",
                        "timed_out",
                        now,
                        rollout_id,
                        r["device_id"],
                    )
                    for r in rows
                ],
            )
        return [r["device_id"] for r in rows]

    def time_out_rollbacks(self, rollout_id: str, reason: str) -> list[str]:
        placeholders = ",".join("?" for _ in TERMINAL)
        with self.transaction() as c:
            rows = c.execute(
                f"SELECT device_id FROM assignments WHERE rollout_id=? AND rb_command_id IS NOT "
                f"NULL AND rb_state NOT IN ({placeholders})",
                (rollout_id, *TERMINAL),
            ).fetchall()
            ids = [r["device_id"] for r in rows]
            c.executemany(
                "UPDATE assignments SET rb_state=?, rb_reason=? WHERE rollout_id=? AND device_id=?",
                [(JobState.TIMED_OUT.value, reason, rollout_id, d) for d in ids],
            )
        return ids

    def record_event(
        self,
        rollout_id: str,
        device_id: str,
        command_id: str,
        seq: int,
        state: str,
        reason: str | None,
        code: str | None,
        at: str | None,
    ) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO rollout_events (rollout_id, device_id, command_id, seq, "
                "state, reason, code, at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (rollout_id, device_id, command_id, seq, state, reason, code, at, time.time()),
            )

    def record_events(self, rows: list[tuple[Any, ...]]) -> None:
        """`record_event` for many at once (one round trip on PostgreSQL): rows of
        (rollout id, device id, command id, seq, state, reason, code, at)."""
        if not rows:
            return
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                "INSERT INTO rollout_events (rollout_id, device_id, command_id, seq, "
                "state, reason, code, at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [(*r, now) for r in rows],
            )

    def terminal_events(self, rollout_id: str) -> set[tuple[str, str]]:
        """(device id, command id) of every job the devices themselves reported a terminal
        state for (as opposed to one the controller timed out)."""
        placeholders = ",".join("?" for _ in TERMINAL)
        with self._lock:
            rows = self.conn.execute(
                f"SELECT DISTINCT device_id, command_id FROM rollout_events "
                f"WHERE rollout_id=? AND state IN ({placeholders})",
                (rollout_id, *sorted(TERMINAL)),
            ).fetchall()
        return {(r[0], r[1]) for r in rows}

    def events(self, rollout_id: str, device_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM rollout_events WHERE rollout_id=?"
        args: tuple[Any, ...] = (rollout_id,)
        if device_id:
            sql += " AND device_id=?"
            args = (rollout_id, device_id)
        with self._lock:
            return [dict(r) for r in self.conn.execute(sql + " ORDER BY received_at, seq", args)]
