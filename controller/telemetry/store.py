"""The telemetry database: raw samples, 1-minute means, latest per device.

On SQLite (WAL) kept apart from the controller's registry database (`telemetry.db` next
to it): the ingester writes thousands of rows a second and must not hold the registry's
write lock. On PostgreSQL, tables of the controller's database, with telemetry_raw
range-partitioned by day (see PARTITION_S); appends take no write lock there.

    telemetry_raw     one row per sample: indexed numeric columns for queries and plots,
                      plus the sample's JSON as received (export jsonl hands it back)
    telemetry_minute  per device and minute: sample count and the mean of each column
    device_latest     the newest sample of each device (watch, metrics)

Retention (`maintain`): raw rows older than `raw_retention_s` (24 h) are folded into
minute means first, then deleted; minute rows older than `minute_retention_s` (30 d) are
deleted (on PostgreSQL, whole days of raw rows by dropping their partitions). Times are
the device's `at`, in Unix seconds.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from controller.db import DB_ERRORS, Database, DatabaseError, describe, open_database, sqlite_path
from controller.db.migrations import PostgresStep, Step, migrate
from protocol.errors import CodedError
from protocol.telemetry import TelemetrySample

log = structlog.get_logger("jetfleet.controller.telemetry")

RAW_RETENTION_S = 24 * 3600
MINUTE_RETENTION_S = 30 * 24 * 3600
# Minutes are (re)computed from raw rows this far back on every maintenance run, so a
# sample that arrives a little late still lands in its minute's mean.
DOWNSAMPLE_LAG_S = 300
# PostgreSQL advisory lock key of maintain(): one maintainer per database at a time.
MAINTAIN_LOCK = 0x6A666D74  # "jfmt"
_MAINTAIN_COUNTS = ("minutes", "raw_deleted", "minute_deleted", "partitions_dropped", "skipped")

# The numeric columns, in row order after (device_id, ts). Plot/export metric names.
METRICS: tuple[str, ...] = (
    "cpu_pct",
    "load1",
    "mem_used",
    "mem_total",
    "swap_used",
    "disk_free",
    "temp_max",
    "gpu_load",
    "gpu_freq",
    "emc_pct",
    "gpu_temp",
    "power_w",
)
METRIC_HELP = {
    "cpu_pct": "mean CPU load over all cores, %",
    "load1": "1-minute load average",
    "mem_used": "memory in use, bytes",
    "mem_total": "memory, bytes",
    "swap_used": "swap in use, bytes",
    "disk_free": "free bytes of the data directory's file system",
    "temp_max": "hottest sensor, °C",
    "gpu_load": "GPU load, %",
    "gpu_freq": "GPU clock, MHz",
    "emc_pct": "memory controller (EMC) load, %",
    "gpu_temp": "GPU temperature, °C",
    "power_w": "board input power, W",
}

Row = tuple[Any, ...]  # (device_id, ts, *METRICS, payload)

_RAW_TABLE = f"""telemetry_raw (
    device_id TEXT NOT NULL,
    ts REAL NOT NULL,
    {", ".join(f"{m} REAL" for m in METRICS)},
    payload TEXT NOT NULL
)"""
_RAW_INDEXES = """
CREATE INDEX IF NOT EXISTS telemetry_raw_device_ts ON telemetry_raw(device_id, ts);
CREATE INDEX IF NOT EXISTS telemetry_raw_ts ON telemetry_raw(ts);
"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_RAW_TABLE};
CREATE INDEX IF NOT EXISTS telemetry_raw_device_ts ON telemetry_raw(device_id, ts);
CREATE INDEX IF NOT EXISTS telemetry_raw_ts ON telemetry_raw(ts);
CREATE TABLE IF NOT EXISTS telemetry_minute (
    device_id TEXT NOT NULL,
    minute INTEGER NOT NULL,
    n INTEGER NOT NULL,
    {", ".join(f"{m} REAL" for m in METRICS)},
    PRIMARY KEY (device_id, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS telemetry_minute_minute ON telemetry_minute(minute);
CREATE TABLE IF NOT EXISTS device_latest (
    device_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    received REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS telemetry_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_RAW_COLUMNS = ("device_id", "ts", *METRICS, "payload")
_LATEST_COLUMNS = ("device_id", "ts", "received", "payload")


def _multi_insert(table: str, columns: Sequence[str], rows: int, suffix: str = "") -> str:
    one = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}{suffix}"


_LATEST_SUFFIX = (
    " ON CONFLICT(device_id) DO UPDATE SET ts = excluded.ts, received = excluded.received, "
    "payload = excluded.payload WHERE excluded.ts >= device_latest.ts"
)


class TelemetryStoreError(CodedError, RuntimeError):
    """A telemetry database that cannot be opened or a query that cannot be answered."""

    code = "telemetry_store"


def default_telemetry_db(controller_db: str | Path) -> str | Path:
    """`telemetry.db` next to a SQLite controller database; PostgreSQL keeps telemetry
    in the controller's database (its own tables)."""
    local = sqlite_path(controller_db)
    return local.with_name("telemetry.db") if local is not None else str(controller_db)


def row_from_sample(sample: TelemetrySample, payload: str) -> Row:
    """The stored row of one sample: numeric columns pulled out once, at ingestion."""
    temps = list(sample.temps.values())
    g = sample.gpu
    if g is not None and g.temp_c is not None:
        temps.append(g.temp_c)
    mem = sample.mem
    power = g.input_power_mw if g is not None else None
    return (
        sample.device_id,
        sample.at.timestamp(),
        sample.cpu.mean_percent,
        sample.cpu.load1,
        mem.used if mem else None,
        mem.total if mem else None,
        mem.swap_used if mem else None,
        sample.disk_free_bytes,
        max(temps) if temps else None,
        g.load_pct if g else None,
        g.freq_mhz if g else None,
        g.emc_pct if g else None,
        g.temp_c if g else None,
        power / 1000.0 if power is not None else None,
        payload,
    )


@dataclass(frozen=True)
class LatestSample:
    device_id: str
    ts: float
    received: float
    payload: str

    def sample(self) -> TelemetrySample:
        return TelemetrySample.decode(self.payload)


def connect(path: str | Path, *, readonly: bool = False, timeout: float = 10.0) -> Database:
    """The telemetry database: a SQLite file (WAL + NORMAL: a committed batch survives a
    process crash; only an OS crash can lose the last batches, which for telemetry is the
    right trade) or the controller's PostgreSQL database."""
    try:
        db = open_database(path, readonly=readonly, timeout=timeout)
        migrate(db, "telemetry", MIGRATIONS, readonly=readonly)
    except DatabaseError as e:
        raise TelemetryStoreError(f"telemetry {e.reason}") from e
    except DB_ERRORS as e:
        raise TelemetryStoreError(f"telemetry database {describe(path)}: {e}") from e
    return db


# PostgreSQL keeps raw samples in one range partition per UTC day of `ts` (plus a default
# partition for samples outside them: a device whose clock is far off, a gap in
# maintenance): retention drops whole past days instead of deleting their rows, and a
# query for a time range reads only its days. Partitions are made ahead, by the writer
# and by each maintenance run, for today and the next PARTITIONS_AHEAD days; never for a
# past day (its samples went to the default partition, which a new partition over them
# would have to move).
PARTITION_S = 86400
PARTITIONS_AHEAD = 2
_PARTITION_PREFIX = "telemetry_raw_day_"


def _partition_raw(db: Database) -> None:
    """Migration step (PostgreSQL): telemetry_raw becomes partitioned by day, rows kept."""
    kind = db.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'telemetry_raw' AND n.nspname = current_schema()"
    ).fetchone()
    if kind is not None and kind[0] == "p":
        return
    db.execute("ALTER TABLE telemetry_raw RENAME TO telemetry_raw_unpartitioned")
    db.execute("DROP INDEX IF EXISTS telemetry_raw_device_ts")
    db.execute("DROP INDEX IF EXISTS telemetry_raw_ts")
    db.execute(db.ddl(f"CREATE TABLE {_RAW_TABLE} PARTITION BY RANGE (ts)"))
    db.execute("CREATE TABLE telemetry_raw_default PARTITION OF telemetry_raw DEFAULT")
    db.executescript(_RAW_INDEXES)
    first = db.execute("SELECT MIN(ts) FROM telemetry_raw_unpartitioned").fetchone()[0]
    now = time.time()
    since = now if first is None else max(float(first), now - RAW_RETENTION_S)
    for day in _days(since, now + PARTITIONS_AHEAD * PARTITION_S):
        _create_partition(db, day)
    db.execute("INSERT INTO telemetry_raw SELECT * FROM telemetry_raw_unpartitioned")
    db.execute("DROP TABLE telemetry_raw_unpartitioned")


def _days(since: float, until: float) -> list[int]:
    """Start times of the UTC days from the one holding `since` to the one holding `until`."""
    first = int(since // PARTITION_S) * PARTITION_S
    return list(range(first, int(until) + 1, PARTITION_S))


def _partition_name(day: int) -> str:
    return _PARTITION_PREFIX + time.strftime("%Y%m%d", time.gmtime(day))


def _create_partition(db: Database, day: int) -> None:
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {_partition_name(day)} PARTITION OF telemetry_raw "
        f"FOR VALUES FROM ({day}) TO ({day + PARTITION_S})"
    )


def raw_partitions(db: Database) -> dict[str, int]:
    """PostgreSQL: the day partitions of telemetry_raw, name -> the day's start."""
    rows = db.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
        "WHERE p.relname = 'telemetry_raw' AND n.nspname = current_schema()"
    ).fetchall()
    out = {}
    for (name,) in rows:
        if name.startswith(_PARTITION_PREFIX):
            day = time.strptime(name[len(_PARTITION_PREFIX) :] + "+0000", "%Y%m%d%z")
            out[name] = int(calendar.timegm(day))
    return out


# Schema steps, oldest first (controller/db/migrations.py): append, never edit.
MIGRATIONS: tuple[Step, ...] = (_SCHEMA, PostgresStep("partition telemetry_raw", _partition_raw))


class TelemetryStore:
    """Writes (one thread) and queries. Readers may open their own with readonly=True."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        local = sqlite_path(path)
        self.path: str | Path = local if local is not None else str(path)
        if readonly and local is not None and not local.is_file():
            raise TelemetryStoreError(
                f"no telemetry database at {self.path} (has `jetfleet serve` run?)"
            )
        self.conn = connect(self.path, readonly=readonly)
        if readonly and not self.conn.columns("telemetry_raw"):
            # A PostgreSQL controller database before its first sample: no data yet,
            # as a SQLite telemetry file that does not exist yet.
            self.conn.close()
            raise TelemetryStoreError(
                f"no telemetry in {describe(self.path)} yet (has `jetfleet serve` run?)"
            )
        self._max_vars = self.conn.max_params
        if not readonly:
            self._partitions_ahead(time.time())
        # A minute's start from a sample time (times are positive: truncation is floor).
        self._minute = (
            "CAST(FLOOR(ts / 60) AS BIGINT) * 60"
            if self.conn.postgres
            else "CAST(ts / 60 AS INTEGER) * 60"
        )

    def close(self) -> None:
        self.conn.close()

    def _partitions_ahead(self, now: float) -> None:
        """PostgreSQL: today's partition and the next days', before their samples come.
        One that cannot be made (today's samples already sit in the default partition)
        is left out: its samples stay in the default partition, read and retained alike."""
        if not self.conn.postgres:
            return
        for day in _days(now, now + PARTITIONS_AHEAD * PARTITION_S):
            try:
                _create_partition(self.conn, day)
            except DB_ERRORS as e:
                log.warning("telemetry_partition_not_made", day=_partition_name(day), error=str(e))

    # -- writing ---------------------------------------------------------------------

    def insert_batch(self, rows: Sequence[Row], received: float | None = None) -> None:
        """One transaction: every raw row, and the newest row of each device as latest.

        Multi-row INSERT statements (up to SQLite's bound-variable limit each) instead of
        executemany: the sqlite3 module gives up the GIL around every statement it steps,
        and a writer thread that steps once per row next to a busy network thread waits
        for the GIL once per row (measured: 119k rows/s alone, 4k/s next to the MQTT
        thread). One step per ~2000 rows makes that wait rare. On PostgreSQL the raw rows
        go in by COPY (bench/telemetry_pg_write.py compares the two).
        """
        if not rows:
            return
        now = time.time() if received is None else received
        newest: dict[str, Row] = {}
        for r in rows:
            cur = newest.get(r[0])
            if cur is None or r[1] >= cur[1]:
                newest[r[0]] = r
        # In device order: ingesters sharing a database then lock device_latest rows in
        # one order, so two batches naming the same devices wait for each other instead
        # of deadlocking (PostgreSQL aborts one; seen with two ingesters at 10,000/s).
        latest = [(d, r[1], now, r[-1]) for d, r in sorted(newest.items())]
        with self.conn.transaction(exclusive=False):
            if self.conn.postgres:
                self.conn.copy_rows("telemetry_raw", _RAW_COLUMNS, rows)
            else:
                self._insert_many("telemetry_raw", _RAW_COLUMNS, rows)
            self._insert_many("device_latest", _LATEST_COLUMNS, latest, _LATEST_SUFFIX)

    def _insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Row], suffix: str = ""
    ) -> None:
        per = max(1, min(2000, self._max_vars // len(columns)))
        for i in range(0, len(rows), per):
            chunk = rows[i : i + per]
            # Full chunks reuse one cached prepared statement; only the tail compiles anew.
            self.conn.execute(
                _multi_insert(table, columns, len(chunk), suffix),
                [v for r in chunk for v in r],
            )

    def maintain(
        self,
        now: float | None = None,
        *,
        raw_retention_s: float = RAW_RETENTION_S,
        minute_retention_s: float = MINUTE_RETENTION_S,
    ) -> dict[str, int]:
        """Fold finished minutes into means, then apply retention. Returns row counts
        (`skipped`: 1 when another process was maintaining the database)."""
        now = time.time() if now is None else now
        means = ", ".join(f"AVG({m})" for m in METRICS)
        replace = ", ".join(f"{c} = excluded.{c}" for c in ("n", *METRICS))
        with self.conn.transaction(exclusive=False):
            # One maintainer at a time: ingesters on several hosts folding the same
            # minutes deadlocked on telemetry_minute's index (seen at 10,000/s); the
            # others skip this round, the next one catches up from downsampled_until.
            if not self.conn.claim(MAINTAIN_LOCK):
                return dict.fromkeys(_MAINTAIN_COUNTS, 0) | {"skipped": 1}
            done_until = self._meta_float("downsampled_until")
            end = (int(now) // 60) * 60  # the current minute is not finished
            if done_until is None:
                first = self.conn.execute("SELECT MIN(ts) FROM telemetry_raw").fetchone()[0]
                start = (int(first) // 60) * 60 if first is not None else end
            else:
                start = int(done_until) - DOWNSAMPLE_LAG_S
            folded = self.conn.execute(
                f"INSERT INTO telemetry_minute (device_id, minute, n, "
                f"{', '.join(METRICS)}) SELECT device_id, {self._minute}, "
                f"COUNT(*), {means} FROM telemetry_raw WHERE ts >= ? AND ts < ? "
                f"GROUP BY device_id, {self._minute} "
                f"ON CONFLICT (device_id, minute) DO UPDATE SET {replace}",
                (start, end),
            ).rowcount
            self._set_meta("downsampled_until", str(end))
            # Never drop a raw row that has not been folded into its minute yet.
            # Cut on a minute boundary, so raw rows always start with a whole minute.
            raw_cut = min((int(now - raw_retention_s) // 60) * 60, end)
            dropped = self._drop_partitions_before(raw_cut)
            raw_deleted = self.conn.execute(
                "DELETE FROM telemetry_raw WHERE ts < ?", (raw_cut,)
            ).rowcount
            minute_deleted = self.conn.execute(
                "DELETE FROM telemetry_minute WHERE minute < ?", (now - minute_retention_s,)
            ).rowcount
        self._partitions_ahead(now)
        return {
            "minutes": folded,
            "raw_deleted": raw_deleted,
            "minute_deleted": minute_deleted,
            "partitions_dropped": dropped,
            "skipped": 0,
        }

    def _drop_partitions_before(self, cut: float) -> int:
        """PostgreSQL: drop the day partitions wholly before `cut` (their minutes are
        folded: `cut` is never past the folded range); rows before `cut` elsewhere (the
        default partition, the day `cut` falls in) are deleted row by row."""
        if not self.conn.postgres:
            return 0
        old = [n for n, day in raw_partitions(self.conn).items() if day + PARTITION_S <= cut]
        for name in old:
            self.conn.execute(f"DROP TABLE {name}")
        return len(old)

    def _meta_float(self, key: str) -> float | None:
        row = self.conn.execute("SELECT value FROM telemetry_meta WHERE key = ?", (key,)).fetchone()
        return float(row[0]) if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO telemetry_meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- reading ---------------------------------------------------------------------

    def count_raw(self, device_id: str | None = None) -> int:
        if device_id is None:
            return int(self.conn.execute("SELECT COUNT(*) FROM telemetry_raw").fetchone()[0])
        return int(
            self.conn.execute(
                "SELECT COUNT(*) FROM telemetry_raw WHERE device_id = ?", (device_id,)
            ).fetchone()[0]
        )

    def devices(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT device_id FROM device_latest ORDER BY 1")]

    def latest(self) -> list[LatestSample]:
        return [
            LatestSample(*r)
            for r in self.conn.execute(
                "SELECT device_id, ts, received, payload FROM device_latest ORDER BY device_id"
            )
        ]

    def raw_rows(
        self, device_id: str, since: float, until: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of one device in time order: {device_id, ts, *METRICS, payload}."""
        cols = ("device_id", "ts", *METRICS, "payload")
        cur = self.conn.execute(
            f"SELECT {', '.join(cols)} FROM telemetry_raw WHERE device_id = ? AND ts >= ? "
            f"AND ts < ? ORDER BY ts",
            (device_id, since, until if until is not None else float("inf")),
        )
        for r in cur:
            yield dict(zip(cols, r, strict=False))

    def minute_rows(
        self, device_id: str, since: float, until: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """1-minute means of one device: {device_id, ts (minute start), n, *METRICS}."""
        cols = ("device_id", "minute", "n", *METRICS)
        cur = self.conn.execute(
            f"SELECT {', '.join(cols)} FROM telemetry_minute WHERE device_id = ? "
            f"AND minute >= ? AND minute < ? ORDER BY minute",
            (device_id, since, until if until is not None else float("inf")),
        )
        for r in cur:
            d = dict(zip(cols, r, strict=False))
            d["ts"] = d.pop("minute")
            yield d

    def series(
        self, device_id: str, metric: str, since: float, until: float | None = None
    ) -> list[tuple[float, float]]:
        """(ts, value) points: raw rows where retention kept them, minute means before."""
        if metric not in METRICS:
            raise TelemetryStoreError(
                f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}"
            )
        hi = until if until is not None else float("inf")
        first_raw = self.conn.execute(
            "SELECT MIN(ts) FROM telemetry_raw WHERE device_id = ?", (device_id,)
        ).fetchone()[0]
        points: list[tuple[float, float]] = []
        if first_raw is None or since < first_raw:
            # Minutes before the first raw row's minute; from there on, raw rows.
            edge = min(hi, (int(first_raw) // 60) * 60) if first_raw is not None else hi
            points += [
                (float(t), float(v))
                for t, v in self.conn.execute(
                    f"SELECT minute, {metric} FROM telemetry_minute WHERE device_id = ? "
                    f"AND minute >= ? AND minute < ? AND {metric} IS NOT NULL ORDER BY minute",
                    (device_id, since, edge),
                )
            ]
        points += [
            (float(t), float(v))
            for t, v in self.conn.execute(
                f"SELECT ts, {metric} FROM telemetry_raw WHERE device_id = ? AND ts >= ? "
                f"AND ts < ? AND {metric} IS NOT NULL ORDER BY ts",
                (device_id, since, hi),
            )
        ]
        return points
