"""The agent's durable state: one SQLite database (WAL, synchronous=FULL) in data_dir.

Tables: `jobs` (one row per accepted command, with its persisted state), `seen` (command ids
with their expiry: replay defense), `outbox` (events waiting for their PUBACK, keyed by
the per-device `seq`), `kv` (device-level values such as the seq counter).

One connection shared by the agent's threads behind a lock: every statement is short,
and a single writer is what SQLite wants anyway.

A database that fails `PRAGMA quick_check` (power cut on a bad SD card, a truncated or
overwritten file) is never a crash loop: `open_store` moves it aside as
state.db.corrupt-<UTC stamp> and starts fresh (docs/agent.md, "A corrupt state.db").
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

from protocol.errors import CodedError
from protocol.fsio import fsync_dir
from protocol.messages import JobEvent, JobState

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS jobs (
    command_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    rollout_id TEXT,
    model TEXT,
    version TEXT,
    envelope BLOB,
    data TEXT NOT NULL DEFAULT '{}',
    code TEXT,
    reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE TABLE IF NOT EXISTS seen (
    command_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

ACTIVE_STATES = tuple(s.value for s in JobState if not s.terminal)
# How long a seen command id is kept after its own expiry: a replay after that is refused
# by the expiry check anyway; the margin covers devices whose clock is a little behind.
SEEN_MARGIN_S = 24 * 3600.0


class JobData(TypedDict, total=False):
    """What a job carries between its steps (the `data` column, JSON): written as the job
    goes, read again when it resumes after a restart."""

    body: dict[str, Any]  # the command's body, as signed (a DeployBody or RollbackBody)
    origin: str  # a converge job: "release" | "pin" (agent/desired.py)
    offline: bool  # `jetfleet-agent install`: no windows, no broker
    resume: bool  # interrupted mid-step: the next start takes it up again
    download: str  # the verified bundle (file:// is read in place)
    bundle: str  # its extracted root
    engine: str  # the engine built and gated for this device
    gate: dict[str, Any] | None  # the gate's figures, reported with STAGED and PROBATION
    staged_at: float  # when it reached STAGED (stage_ttl_s counts from here)
    activate: str  # a STAGED job's `activate` command id: it may switch now
    activated_at: float
    busy_since: float | None  # when the busy lock first held its switch back
    hold_key: str  # what its last ON_HOLD event said (a change is news)
    prev: dict[str, str | None]  # the slot before the switch: what a rollback restores


@dataclass
class JobRecord:
    command_id: str
    kind: str
    state: JobState
    rollout_id: str | None
    model: str | None
    version: str | None
    envelope: bytes | None
    data: JobData = field(default_factory=JobData)
    code: str | None = None
    reason: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0


class StoreError(CodedError):
    """state.db cannot be used; `code` is stable, `reason` one line for people."""

    code = "state_db"


class StoreCorruptError(StoreError):
    code = "state_corrupt"


def _corrupt(path: Path, detail: str) -> StoreCorruptError:
    return StoreCorruptError(f"state database {path} is corrupt ({detail})")


@contextmanager
def _corruption_named(path: Path) -> Iterator[None]:
    """SQLITE_CORRUPT / SQLITE_NOTADB become StoreCorruptError; an OperationalError (cannot
    open, permissions, I/O, read-only) is not the file's fault and passes unchanged."""
    try:
        yield
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as e:
        raise _corrupt(path, str(e)) from e


class Store:
    """Thread-safe access to state.db; every write commits (fsync) before returning.

    `readonly`: for the diagnostic tools, which must work exactly when the disk is
    broken: never creates, migrates or writes anything, and reads a database on a
    read-only file system too. Raises StoreCorruptError when the file is not a sound
    SQLite database."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        with _corruption_named(self.path):
            self._db = self._connect_readonly() if readonly else self._connect()
            try:
                self._check()
                if not readonly:
                    self._init_schema()
            except BaseException:
                self._db.close()
                raise

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        db.row_factory = sqlite3.Row
        return db

    def _connect_readonly(self) -> sqlite3.Connection:
        # mode=ro still needs to create the WAL index (-shm) beside the file; on a
        # read-only file system only immutable=1 opens it (nothing can write there anyway).
        for query in ("mode=ro", "immutable=1"):
            db = sqlite3.connect(
                f"file:{self.path}?{query}", uri=True, check_same_thread=False, timeout=30.0
            )
            db.row_factory = sqlite3.Row
            try:
                db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                return db
            except sqlite3.OperationalError:
                db.close()
                if query == "immutable=1":
                    raise
            except sqlite3.DatabaseError:
                db.close()
                raise
        raise AssertionError("unreachable")

    def _check(self) -> None:
        rows = self._db.execute("PRAGMA quick_check").fetchall()
        problems = [str(r[0]) for r in rows if r[0] != "ok"]
        if problems:
            raise _corrupt(self.path, "; ".join(problems[:3])[:300])

    def _init_schema(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss, which is the whole point of persisting a
        # state before acting on it.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_DDL)
        with self.tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO kv(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the lock; commits on success, rolls back else."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- kv -------------------------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def put(self, key: str, value: str) -> None:
        with self.tx() as db:
            self.put_kv(db, key, value)

    def put_kv(self, db: sqlite3.Connection, key: str, value: str) -> None:
        """`put` inside the caller's transaction."""
        db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", (key, value))

    def delete_kv(self, db: sqlite3.Connection, key: str) -> None:
        db.execute("DELETE FROM kv WHERE key=?", (key,))

    # ---- reset after corruption ---------------------------------------------------------
    def record_reset(self, at: float, reason: str, seq_floor: int) -> None:
        """Remember when this database replaced a corrupt one (commands issued before that
        cannot be checked for replay any more) and lift `seq` above anything the old
        database can have published: the controller drops events at or below its last."""
        with self.tx() as db:
            for key, value in (("reset_at", repr(at)), ("reset_reason", reason)):
                db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", (key, value))
            db.execute(
                "INSERT OR REPLACE INTO kv(key, value) VALUES ('seq', ?)",
                (str(max(self.last_seq(), seq_floor)),),
            )

    def reset_at(self) -> float | None:
        """When state.db was last started fresh after corruption (epoch seconds), if ever."""
        value = self.get("reset_at")
        return float(value) if value is not None else None

    # ---- replay defense ---------------------------------------------------------------
    def seen(self, command_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM seen WHERE command_id=?", (command_id,)
            ).fetchone()
        return row is not None

    def mark_seen(self, db: sqlite3.Connection, command_id: str, expires_at: float) -> None:
        db.execute(
            "INSERT OR REPLACE INTO seen(command_id, expires_at) VALUES (?, ?)",
            (command_id, expires_at),
        )

    def prune_jobs(
        self,
        now: float,
        *,
        keep: int = 1000,
        max_age_s: float = 30 * 86400,
        min_keep: int = 20,
    ) -> int:
        """Forget finished jobs beyond the newest `keep` (a busy robot writes ~2.3 KB a
        job), and those older than `max_age_s` but for the newest `min_keep` (what
        `status` shows of a quiet device). Their command ids stay in `seen` until they
        expire, so replay defense is unaffected."""
        marks = ",".join("?" for _ in ACTIVE_STATES)
        newest = (
            f"SELECT rowid FROM jobs WHERE state NOT IN ({marks}) "
            "ORDER BY updated_at DESC, rowid DESC LIMIT ?"
        )
        with self.tx() as db:
            cur = db.execute(
                f"DELETE FROM jobs WHERE state NOT IN ({marks}) AND (rowid NOT IN ({newest}) "
                f"OR (updated_at < ? AND rowid NOT IN ({newest})))",
                (*ACTIVE_STATES, *ACTIVE_STATES, keep, now - max_age_s, *ACTIVE_STATES, min_keep),
            )
            return cur.rowcount

    def job_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def purge_seen(self, now: float) -> int:
        with self.tx() as db:
            cur = db.execute("DELETE FROM seen WHERE expires_at < ?", (now - SEEN_MARGIN_S,))
            return cur.rowcount

    # ---- events (outbox) ------------------------------------------------------------
    def next_seq(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM kv WHERE key='seq'").fetchone()
        seq = int(row[0]) + 1 if row else 1
        db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES ('seq', ?)", (str(seq),))
        return seq

    def last_seq(self) -> int:
        return int(self.get("seq", "0") or 0)

    def add_event(self, db: sqlite3.Connection, topic: str, fields: dict[str, Any]) -> JobEvent:
        """Give the event the next seq and queue it for publishing, in the caller's tx."""
        seq = self.next_seq(db)
        event = JobEvent.new(seq=seq, **fields)
        db.execute(
            "INSERT INTO outbox(seq, topic, payload, created_at) VALUES (?, ?, ?, ?)",
            (seq, topic, event.encode(), time.time()),
        )
        return event

    def outbox_after(self, seq: int, limit: int = 100) -> list[tuple[int, str, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def outbox_ack(self, seqs: Iterable[int]) -> None:
        seqs = list(seqs)
        if not seqs:
            return
        with self.tx() as db:
            db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])

    def outbox_size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # ---- jobs -----------------------------------------------------------------------
    def insert_job(self, db: sqlite3.Connection, job: JobRecord) -> None:
        now = time.time()
        job.created_at = job.updated_at = now
        db.execute(
            "INSERT INTO jobs(command_id, kind, state, rollout_id, model, version, envelope,"
            " data, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.command_id,
                job.kind,
                job.state.value,
                job.rollout_id,
                job.model,
                job.version,
                job.envelope,
                json.dumps(job.data),
                now,
                now,
            ),
        )

    def update_job(
        self,
        db: sqlite3.Connection,
        command_id: str,
        *,
        state: JobState | None = None,
        data: JobData | None = None,
        model: str | None = None,
        version: str | None = None,
        code: str | None = None,
        reason: str | None = None,
        attempts: int | None = None,
    ) -> None:
        sets: list[str] = ["updated_at=?"]
        args: list[Any] = [time.time()]
        for col, val in (
            ("state", state.value if state else None),
            ("data", json.dumps(data) if data is not None else None),
            ("model", model),
            ("version", version),
            ("code", code),
            ("reason", reason),
            ("attempts", attempts),
        ):
            if val is not None:
                sets.append(f"{col}=?")
                args.append(val)
        args.append(command_id)
        db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE command_id=?", args)

    def job(self, command_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE command_id=?", (command_id,)
            ).fetchone()
        return _job(row) if row else None

    def active_jobs(self) -> list[JobRecord]:
        marks = ",".join("?" for _ in ACTIVE_STATES)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at, rowid",
                ACTIVE_STATES,
            ).fetchall()
        return [_job(r) for r in rows]

    def latest_rollout_job(self, model: str, scan: int = 200) -> JobRecord | None:
        """The last deploy or rollback of `model` a rollout commanded (among the last
        `scan` rollout jobs: older ones are history)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE rollout_id IS NOT NULL AND kind IN ('deploy', "
                "'rollback') ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (scan,),
            ).fetchall()
        for job in map(_job, rows):
            if (job.model or (job.data.get("body") or {}).get("name")) == model:
                return job
        return None

    def recent_jobs(self, limit: int = 20) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs ORDER BY updated_at DESC, rowid DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_job(r) for r in rows]

    def request_cancel(self, db: sqlite3.Connection, command_id: str) -> None:
        db.execute("UPDATE jobs SET cancel_requested=1 WHERE command_id=?", (command_id,))

    def request_activate(self, db: sqlite3.Connection, command_id: str, by: str) -> None:
        """A STAGED deploy may switch now (`activate` command `by`); read by the worker."""
        db.execute(
            "UPDATE jobs SET data=json_set(data, '$.activate', ?, '$.activated_at', ?) "
            "WHERE command_id=?",
            (by, time.time(), command_id),
        )

    def canceled_by(self, db: sqlite3.Connection, command_id: str) -> str | None:
        """The id of a cancel command this device accepted for `command_id`, if any (a
        cancel may arrive before the command it names)."""
        row = db.execute(
            "SELECT command_id FROM jobs WHERE kind='cancel' AND state=? "
            "AND json_extract(data, '$.body.command_id')=? LIMIT 1",
            (JobState.SUCCEEDED.value, command_id),
        ).fetchone()
        return str(row[0]) if row else None

    def cancel_requested(self, command_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT cancel_requested FROM jobs WHERE command_id=?", (command_id,)
            ).fetchone()
        return bool(row and row[0])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}


@dataclass(frozen=True)
class StoreReset:
    """What open_store did with a corrupt database."""

    reason: str  # why: the SQLite error or quick_check finding
    moved_to: Path  # the corrupt file, kept for a post-mortem
    at: float

    @property
    def message(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at))
        return (
            f"{self.reason}: moved aside as {self.moved_to.name}, started with an empty "
            "state (installed models and active engines are untouched); commands issued "
            f"before {when} are refused as state_reset: issue them again"
        )


def quarantine(path: Path, at: float) -> Path:
    """Move a database and its -wal/-shm aside as <name>.corrupt-<UTC stamp>[-wal|-shm]."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))
    dest = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{dest}{suffix}"))
    fsync_dir(path.parent)
    return dest


def open_store(path: Path, now: float | None = None) -> tuple[Store, StoreReset | None]:
    """The agent's database, started fresh if the one on disk is corrupt.

    Nothing else is touched: the models/ links (what the robot runs, and what the status
    reports) live outside the database. Lost with it: the job history, events not yet
    sent, and the replay table, hence record_reset."""
    try:
        return Store(path), None
    except StoreCorruptError as e:
        at = time.time() if now is None else now
        # The seq floor: epoch milliseconds, of now or of the corrupt file's last write
        # (a Jetson without RTC may boot in 1970), exceed any count of events published.
        last_write = path.stat().st_mtime
        moved = quarantine(path, at)
        store = Store(path)
        store.record_reset(at, e.reason, int(max(at, last_write) * 1000))
        return store, StoreReset(e.reason, moved, at)


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        command_id=row["command_id"],
        kind=row["kind"],
        state=JobState(row["state"]),
        rollout_id=row["rollout_id"],
        model=row["model"],
        version=row["version"],
        envelope=bytes(row["envelope"]) if row["envelope"] is not None else None,
        data=cast(JobData, json.loads(row["data"] or "{}")),
        code=row["code"],
        reason=row["reason"],
        cancel_requested=bool(row["cancel_requested"]),
        attempts=int(row["attempts"]),
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )
