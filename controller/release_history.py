"""Reads of the release and pin documents this controller signed (`release_history`,
written by `jetfleet release`): the console's releases view and robots' drift."""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any


class ReleaseHistory:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._lock = threading.RLock()

    def entries(self, scope: str | None = None) -> list[dict[str, Any]]:
        """Newest first: {scope, version, issued_at, models: {name: {version, ...}}}."""
        sql = "SELECT scope, version, issued_at, models FROM release_history"
        args: tuple[str, ...] = ()
        if scope:
            sql, args = sql + " WHERE scope=?", (scope,)
        try:
            with self._lock:
                rows = self.conn.execute(
                    sql + " ORDER BY issued_at DESC, version DESC", args
                ).fetchall()
        except sqlite3.OperationalError:  # no release was ever signed here
            return []
        return [
            {"scope": r[0], "version": r[1], "issued_at": r[2], "models": json.loads(r[3])}
            for r in rows
        ]

    def current(self) -> dict[str, dict[str, Any]]:
        """scope (group:NAME or device:ID) -> its newest document."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.entries():
            out.setdefault(e["scope"], e)
        return out


def desired_versions(
    groups: list[str], device_id: str, current: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """model -> the version this device should run, as the agent decides it
    (agent/desired.py): its pin, else its groups' releases; groups that disagree on a
    model leave it out."""
    want: dict[str, str] = {}
    conflicts: set[str] = set()
    for g in sorted(groups):
        for name, m in (current.get(f"group:{g}") or {}).get("models", {}).items():
            if want.setdefault(name, m.get("version")) != m.get("version"):
                conflicts.add(name)
    for name in conflicts:
        want.pop(name, None)
    for name, m in (current.get(f"device:{device_id}") or {}).get("models", {}).items():
        want[name] = m.get("version")
    return {k: v for k, v in want.items() if v}
