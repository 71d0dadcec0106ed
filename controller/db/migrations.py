"""Versioned schema migrations, applied when a store opens its database (both engines).

Each store names its component and lists its steps, oldest first; the component's
version is the number of steps applied, kept in `schema_version`. A step is DDL (in
SQLite's words, see `Database.ddl`), an `AddColumn`, which is idempotent so databases
from before this table (they have some of the columns already) upgrade too, or a
`PostgresStep` that only PostgreSQL runs. Adding a
table or a column is appending a step to its store's list; never edit or reorder one
that shipped.

A database whose version is above the code's is refused (an older controller must not
write rows a newer one reads differently)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controller.db import Database, DatabaseError


@dataclass(frozen=True)
class AddColumn:
    table: str
    column: str
    type: str  # SQLite's words: TEXT, REAL, INTEGER NOT NULL DEFAULT 0…


@dataclass(frozen=True)
class PostgresStep:
    """A step only PostgreSQL needs (e.g. partitioning): `apply(db)` runs there, inside
    the migration's transaction; on SQLite the step is counted and does nothing."""

    name: str
    apply: Callable[[Database], None]


Step = str | AddColumn | PostgresStep

_VERSIONS = """CREATE TABLE IF NOT EXISTS schema_version (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)"""


class SchemaTooNewError(DatabaseError):
    """The database was written by a newer controller than this one."""

    code = "schema_too_new"


def schema_version(db: Database, component: str) -> int:
    """The component's applied version (0: none, or a database from before versions)."""
    if "version" not in db.columns("schema_version"):
        return 0
    row = db.execute(
        "SELECT version FROM schema_version WHERE component=?", (component,)
    ).fetchone()
    return int(row[0]) if row else 0


def migrate(db: Database, component: str, steps: Sequence[Step], *, readonly: bool = False) -> int:
    """Bring `component` up to len(steps); returns the version. Concurrent openers are
    serialized by the write transaction; the second finds nothing left to do."""
    target = len(steps)
    current = schema_version(db, component)
    _refuse_newer(db, component, current, target)
    if current == target or readonly:
        return current
    with db.transaction():
        db.executescript(_VERSIONS)
        current = schema_version(db, component)
        _refuse_newer(db, component, current, target)
        for step in steps[current:]:
            _apply(db, step)
        db.execute(
            "INSERT INTO schema_version (component, version) VALUES (?, ?) "
            "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
            (component, target),
        )
    return target


def _refuse_newer(db: Database, component: str, current: int, target: int) -> None:
    if current > target:
        raise SchemaTooNewError(
            f"database {db} has {component} schema version {current}, newer than this "
            f"controller's {target}: upgrade jetfleet (or use another --db)"
        )


def _apply(db: Database, step: Step) -> None:
    if isinstance(step, PostgresStep):
        if db.postgres:
            step.apply(db)
        return
    if isinstance(step, AddColumn):
        if step.column not in db.columns(step.table):
            db.execute(db.ddl(f"ALTER TABLE {step.table} ADD COLUMN {step.column} {step.type}"))
        return
    db.executescript(step)
