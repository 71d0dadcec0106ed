"""The controller's database, SQLite or PostgreSQL, behind one small interface.

`open_database(target)` takes a file path, `sqlite:///PATH` or `postgresql://…` and
returns a `Database` whose `execute`/`executemany` take SQLite-style `?` parameters on
both engines (PostgreSQL gets them as `%s`). The stores write SQL both engines accept
(`INSERT … ON CONFLICT`, `CASE` instead of SQLite's two-argument `MAX`, `RETURNING`)
and their DDL in SQLite's words, which `ddl()` turns into PostgreSQL's (REAL is a
double, INTEGER a bigint, BLOB a bytea).

`transaction()` is SQLite's BEGIN IMMEDIATE on both: one writer at a time, taken when
the transaction begins, so a read-then-write inside it (is this device held? has this
assignment a command?) cannot race another process. On PostgreSQL that is a
transaction-scoped advisory lock every writer takes first. `snapshot()` is several reads
that see one state (SQLite's read transaction, PostgreSQL's REPEATABLE READ).
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from protocol.errors import CodedError

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
_PG_SCHEMES = ("postgresql://", "postgres://")
# The advisory lock every PostgreSQL write transaction holds (any fixed number: one
# lock per database, like SQLite's one writer).
_WRITE_LOCK = 0x6A666C74  # "jflt"
_PG_PARAM_LIMIT = 30000  # of 65535 bound parameters per statement

try:  # the PostgreSQL driver is optional (pip install jetfleet[postgresql])
    import psycopg
    from psycopg import errors as pg_errors

    DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, psycopg.Error)
except ImportError:  # pragma: no cover - the base install
    psycopg = None  # type: ignore[assignment]
    DB_ERRORS = (sqlite3.Error,)


class DatabaseError(CodedError):
    """A database that cannot be opened (bad URL, no server, no driver)."""

    code = "database"


def is_url(target: str | Path) -> bool:
    """Whether a --db value names a server database rather than a file."""
    return str(target).startswith(_PG_SCHEMES)


def sqlite_path(target: str | Path) -> Path | None:
    """The file of a SQLite target (a path, or `sqlite:///PATH`); None for a server."""
    text = str(target)
    if is_url(text):
        return None
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif "://" in text:
        raise DatabaseError(
            f"--db {text}: use a file path, sqlite:///PATH or postgresql://USER@HOST/DBNAME"
        )
    return Path(text).expanduser()


def describe(target: str | Path) -> str:
    """The target for a message: a server URL without its password."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", str(target))


class Row(tuple[Any, ...]):
    """A PostgreSQL row that reads like sqlite3.Row: by index, by name, and dict(row)."""

    _names: tuple[str, ...]
    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor: Any) -> Any:
    """Called for every statement: the column names straight from the result (no
    `description` objects) and one Row class per distinct set of names, made once."""
    res = cursor.pgresult
    # A COPY result has fields but no names: no rows come back from it either.
    names = tuple((res.fname(i) or b"").decode() for i in range(res.nfields)) if res else ()
    return _row_class(names)


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[Row]:
    return type("Row", (Row,), {"_names": names, "_index": {n: i for i, n in enumerate(names)}})


_TYPES = [
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\)\s*WITHOUT ROWID"), ")"),
]


class Database:
    """One connection, shared by the stores of one process (and its threads: statements
    are serialized by the engine's driver; a transaction by `transaction()`'s lock)."""

    def __init__(self, conn: Any, dialect: str, target: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.target = target
        self._lock = threading.RLock()
        self._sql: dict[str, str] = {}
        self._later: list[tuple[str, Sequence[Any]]] = []  # see execute_later
        self._owner: int | None = None  # the thread inside transaction()
        # Pipeline mode needs libpq 14 or later (psycopg[binary] ships one).
        self._pipelines = dialect == POSTGRESQL and bool(psycopg.Pipeline.is_supported())
        self.max_params = 999 if dialect == SQLITE else _PG_PARAM_LIMIT
        if dialect == SQLITE:
            getlimit = getattr(conn, "getlimit", None)
            which = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)
            if getlimit is not None and which is not None:
                self.max_params = int(getlimit(which))

    @classmethod
    def wrap(cls, conn: sqlite3.Connection | Database) -> Database:
        """A Database for a connection some caller opened itself (tests, old callers)."""
        if isinstance(conn, Database):
            return conn
        conn.row_factory = sqlite3.Row
        return cls(conn, SQLITE, "sqlite connection")

    @property
    def postgres(self) -> bool:
        return self.dialect == POSTGRESQL

    def __str__(self) -> str:
        return describe(self.target)

    @property
    def now_sql(self) -> str:
        """SQL for the database's clock in Unix seconds: what leases expire by, so that
        controller hosts whose clocks disagree still agree on expiry (one host for a
        SQLite file)."""
        if self.dialect == SQLITE:
            return "((julianday('now') - 2440587.5) * 86400.0)"
        return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"

    # -- statements ------------------------------------------------------------------
    def _translate(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = sql.replace("%", "%%").replace("?", "%s")
            self._sql[sql] = out
        return out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """A cursor (fetchone, fetchall, rowcount, iteration) on both engines."""
        if self.dialect == SQLITE:
            return self.conn.execute(sql, params)
        if self._later and self._owner == threading.get_ident():
            return self._send_later(lambda: self._execute_pg(sql, params))
        return self._execute_pg(sql, params)

    def _execute_pg(self, sql: str, params: Sequence[Any]) -> Any:
        if not params:
            return self.conn.execute(sql)
        return self.conn.execute(self._translate(sql), params)

    def execute_later(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A write whose outcome nobody reads (no rows, no rowcount). Inside a PostgreSQL
        transaction it waits for the next statement on this connection, or the commit,
        and reaches the server with it in one round trip (psycopg's pipeline mode): a
        job event's registry write then shares the round trip of its assignment's
        update. In SQLite, or outside a transaction, it runs now. Its error, if any,
        is raised by the statement it travels with, in the same transaction. Only the
        thread that holds the transaction defers (another thread's statement on the
        shared connection neither waits for it nor sends it)."""
        if self._pipelines and self._owner == threading.get_ident():
            self._later.append((self._translate(sql) if params else sql, params))
        else:
            self.execute(sql, params)

    def _send_later(self, then: Callable[[], Any] | None = None) -> Any:
        """The waiting writes, then `then`'s statement, in one pipeline: one round trip;
        on leaving it every result is in (a cursor `then` returns can be read)."""
        later, self._later = self._later, []
        result = None
        with self.conn.pipeline():
            for sql, params in later:
                self.conn.execute(sql, params or None)
            if then is not None:
                result = then()
        return result

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any:
        if self.dialect == SQLITE:
            return self.conn.executemany(sql, rows)
        if self._later and self._owner == threading.get_ident():
            self._send_later()
        cur = self.conn.cursor()
        cur.executemany(self._translate(sql), list(rows))
        return cur

    def execute_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """The statement once per row of parameters, in order; each one's first result row
        (None where it returned none), e.g. an `UPDATE … RETURNING` per job event. On
        PostgreSQL one `executemany` in pipeline mode: one round trip and ~15 µs of client
        CPU a row instead of ~70 µs a statement."""
        if not rows:
            return []
        if self.dialect == SQLITE:
            return [self.conn.execute(sql, r).fetchone() for r in rows]
        if self._later and self._owner == threading.get_ident():
            self._send_later()
        cur = self.conn.cursor()
        cur.executemany(self._translate(sql), list(rows), returning=True)
        out = [cur.fetchone()]
        while cur.nextset():
            out.append(cur.fetchone())
        return out

    def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Append rows with PostgreSQL's COPY FROM STDIN: one stream per batch, nothing to
        plan or bind per row (PostgreSQL's documented bulk-loading path; a partitioned
        table routes each row to its partition). SQLite has no COPY: multi-row INSERTs."""
        if not self.postgres:
            raise DatabaseError(f"COPY into {table}: {self} is SQLite, which appends by INSERT")
        if self._later and self._owner == threading.get_ident():
            self._send_later()
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        with self.conn.cursor() as cur, cur.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)

    def executescript(self, ddl: str) -> None:
        """Statements without parameters (DDL written in SQLite's words), one at a time:
        sqlite3's own executescript would commit the transaction it runs in."""
        for statement in re.sub(r"--[^\n]*", "", ddl).split(";"):
            if statement.strip():
                self.execute(self.ddl(statement))

    def ddl(self, sql: str) -> str:
        if self.dialect == SQLITE:
            return sql
        for pattern, replacement in _TYPES:
            sql = pattern.sub(replacement, sql)
        return sql

    def columns(self, table: str) -> set[str]:
        """The columns `table` has (empty: no such table)."""
        if self.dialect == SQLITE:
            return {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
        rows = self.conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s",
            (table,),
        )
        return {r[0] for r in rows}

    # -- transactions ----------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        if self.dialect == SQLITE:
            return bool(self.conn.in_transaction)
        return bool(self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)

    @contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[Database]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT); nested calls join the outer one.
        `exclusive=False`: on PostgreSQL, a plain transaction that does not wait for the
        other writers (telemetry: appends that no read-then-write depends on)."""
        with self._lock:
            if self.in_transaction:
                yield self
                return
            if self.dialect == SQLITE:
                self.conn.execute("BEGIN IMMEDIATE")
            else:
                self.conn.execute("BEGIN")
                if exclusive:
                    self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            self._owner = threading.get_ident()
            try:
                yield self
                self.execute("COMMIT")
            except BaseException:
                self._later.clear()
                # SQLite may have rolled back already (SQLITE_FULL in a statement); a
                # failed COMMIT leaves the transaction open.
                if self.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            finally:
                self._owner = None

    @contextmanager
    def snapshot(self) -> Iterator[Database]:
        """Reads that see one state of the database, whatever commits meanwhile (counts
        and the rows they count must agree): SQLite's read transaction, PostgreSQL's
        REPEATABLE READ. Inside a transaction, that transaction's view."""
        with self._lock:
            if self.in_transaction:
                yield self
                return
            if self.dialect == SQLITE:
                self.conn.execute("BEGIN")
            else:
                self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield self
            finally:
                if self.in_transaction:
                    self.conn.execute("COMMIT")

    def claim(self, key: int) -> bool:
        """Inside a transaction: take the named job for this transaction if no other
        process holds it (PostgreSQL: a transaction-scoped advisory lock, not waited
        for). On SQLite the write transaction already excludes every other writer."""
        if self.dialect == SQLITE:
            return True
        row = self.execute("SELECT pg_try_advisory_xact_lock(?)", (key,)).fetchone()
        return bool(row[0])

    def close(self) -> None:
        self.conn.close()


def is_disk_full(err: BaseException) -> bool:
    """The database's disk has no room for the write (SQLITE_FULL, or PostgreSQL's
    disk_full)."""
    if psycopg is not None and isinstance(err, pg_errors.DiskFull):
        return True
    return isinstance(err, sqlite3.OperationalError) and (
        getattr(err, "sqlite_errorcode", None) == _SQLITE_FULL
        or "database or disk is full" in str(err)
    )


_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL (Python 3.11), not in every typeshed


def open_database(
    target: str | Path,
    *,
    readonly: bool = False,
    timeout: float = 30.0,
    synchronous: str = "NORMAL",
) -> Database:
    """The controller's database at `target`. SQLite files are opened in WAL mode (a
    reader never waits for the writer), created with their directory if missing."""
    path = sqlite_path(target)
    if path is None:
        return _open_postgres(str(target), readonly=readonly, timeout=timeout)
    try:
        if readonly:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro",
                uri=True,
                timeout=timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(path), timeout=timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across a process kill (the WAL is on disk); only a power
            # cut may lose the last transactions (rollout resume tolerates that).
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as e:
        raise DatabaseError(f"database {path}: {e}") from e
    conn.row_factory = sqlite3.Row
    return Database(conn, SQLITE, str(path))


def _open_postgres(url: str, *, readonly: bool, timeout: float) -> Database:
    if psycopg is None:
        raise DatabaseError(
            f"--db {describe(url)} needs the PostgreSQL driver: pip install 'jetfleet[postgresql]'"
        )
    try:
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=max(1, int(timeout)), row_factory=_row_factory
        )
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseError(f"database {describe(url)}: {first}") from e
    _ints_for_bools(conn)
    if readonly:
        conn.execute("SET default_transaction_read_only = on")
    return Database(conn, POSTGRESQL, url)


def _ints_for_bools(conn: Any) -> None:
    """Python booleans go to PostgreSQL as 0/1, as SQLite stores them (the columns are
    integers on both)."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class BoolAsInt(Dumper):
        format = Format.TEXT
        oid = psycopg.postgres.types["int8"].oid

        def dump(self, obj: Any) -> bytes:
            return b"1" if obj else b"0"

    conn.adapters.register_dumper(bool, BoolAsInt)
