"""Every release and pin document this controller signed (`jetfleet release history`),
in the controller database next to the registry and the rollouts.

The history is what keeps a group's (a device's) document versions going up when the
broker lost its retained copy: the next version is above both."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from controller.db import Database
from controller.db.migrations import Step, migrate
from protocol.release import Pins, Release

_SCHEMA = """
CREATE TABLE IF NOT EXISTS release_history (
    scope TEXT NOT NULL,          -- group:NAME or device:ID
    version INTEGER NOT NULL,
    issued_at TEXT NOT NULL,
    models TEXT NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (scope, version)
)
"""


# What each rollout did to the release of each group it targeted (`rollout status`).
_ROLLOUT_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollout_releases (
    rollout_id TEXT NOT NULL,
    group_name TEXT NOT NULL,
    outcome TEXT NOT NULL,        -- set | unchanged | failed
    version INTEGER,              -- the group's release version it set or found
    reason TEXT,                  -- why it failed
    PRIMARY KEY (rollout_id, group_name)
)
"""


def read_rollout_releases(conn: Database, rollout_id: str) -> list[dict[str, Any]]:
    """{group, outcome, version, reason} per group the rollout targeted, by group; readable
    on a read-only connection (none before the first rollout set a release here)."""
    if not conn.columns("rollout_releases"):
        return []
    rows = conn.execute(
        "SELECT group_name, outcome, version, reason FROM rollout_releases "
        "WHERE rollout_id=? ORDER BY group_name",
        (rollout_id,),
    ).fetchall()
    return [{"group": r[0], "outcome": r[1], "version": r[2], "reason": r[3]} for r in rows]


def latest_documents(conn: Database) -> dict[str, dict[str, Any]]:
    """scope -> models of the newest document of each scope; readable on a read-only
    connection (none before the first release was set here)."""
    if not conn.columns("release_history"):
        return {}
    rows = conn.execute(
        "SELECT h.scope, h.models FROM release_history h JOIN (SELECT scope, MAX(version) "
        "v FROM release_history GROUP BY scope) m ON h.scope = m.scope AND h.version = m.v"
    ).fetchall()
    return {str(scope): json.loads(models) for scope, models in rows}


def read_history(conn: Database, scope: str | None = None) -> list[dict[str, Any]]:
    """Newest first: {scope, version, issued_at, models}; readable on a read-only
    connection (none before the first release was set here)."""
    if not conn.columns("release_history"):
        return []
    sql = "SELECT scope, version, issued_at, models FROM release_history"
    args: tuple[str, ...] = ()
    if scope is not None:
        sql, args = sql + " WHERE scope=?", (scope,)
    rows = conn.execute(sql + " ORDER BY issued_at DESC, version DESC", args).fetchall()
    return [
        {"scope": r[0], "version": r[1], "issued_at": r[2], "models": json.loads(r[3])}
        for r in rows
    ]


def current_documents(conn: Database) -> dict[str, dict[str, Any]]:
    """scope (group:NAME or device:ID) -> its newest document, as `read_history` gives."""
    out: dict[str, dict[str, Any]] = {}
    for e in read_history(conn):
        out.setdefault(e["scope"], e)
    return out


class ReleaseStore:
    # Schema steps, oldest first (controller/db/migrations.py): append, never edit.
    MIGRATIONS: tuple[Step, ...] = (_SCHEMA, _ROLLOUT_SCHEMA)

    def __init__(self, conn: Database | sqlite3.Connection) -> None:
        self.conn = Database.wrap(conn)
        migrate(self.conn, "releases", self.MIGRATIONS)

    def record(self, scope: str, doc: Release | Pins, envelope: bytes) -> None:
        """Store a signed document; the same scope and version again replaces it."""
        models = {n: m.model_dump() for n, m in doc.models.items()}
        self.conn.execute(
            "INSERT INTO release_history (scope, version, issued_at, models, envelope) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, version) DO UPDATE SET "
            "issued_at=excluded.issued_at, models=excluded.models, envelope=excluded.envelope",
            (scope, doc.version, doc.issued_at.isoformat(), json.dumps(models), envelope),
        )

    def last_version(self, scope: str) -> int:
        row = self.conn.execute(
            "SELECT MAX(version) FROM release_history WHERE scope=?", (scope,)
        ).fetchone()
        return int(row[0] or 0)

    def history(self, scope: str | None = None) -> list[dict[str, Any]]:
        """Newest first: {scope, version, issued_at, models}."""
        return read_history(self.conn, scope)

    def record_rollout(
        self,
        rollout_id: str,
        group: str,
        outcome: str,
        version: int | None = None,
        reason: str | None = None,
    ) -> None:
        """What rollout `rollout_id` did to `group`'s release (set, unchanged, failed)."""
        self.conn.execute(
            "INSERT INTO rollout_releases (rollout_id, group_name, outcome, version, reason) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (rollout_id, group_name) DO UPDATE SET "
            "outcome=excluded.outcome, version=excluded.version, reason=excluded.reason",
            (rollout_id, group, outcome, version, reason),
        )

    def rollout_releases(self, rollout_id: str) -> list[dict[str, Any]]:
        return read_rollout_releases(self.conn, rollout_id)
