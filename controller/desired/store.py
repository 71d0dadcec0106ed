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
    MIGRATIONS: tuple[Step, ...] = (_SCHEMA,)

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
