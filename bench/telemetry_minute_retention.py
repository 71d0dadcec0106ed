"""Retention of minute means on PostgreSQL: a dropped day partition against DELETE.

Two databases on one private PostgreSQL server (the tests' `LocalPostgres`: fsync off,
so CPU and the page cache, not a disk), holding the same minute means of N devices: the
day to expire (one row per device and minute, 1,440 a device) and the days kept after
it. One is at the current schema (telemetry_minute partitioned by day); the other at
the schema before (the table unpartitioned), as a controller that has not upgraded.

    new: `TelemetryStore.maintain()` at the day boundary: drops the day's partition
    old:  the statement `maintain()` ran before, in its transaction: DELETE FROM
          telemetry_minute WHERE minute < cut (the cut a float, as it was)

Each followed by `VACUUM telemetry_minute` (what autovacuum would do next: the DELETE
leaves every deleted row dead in the table and its two indexes). Both databases are
loaded and VACUUM ANALYZEd first, and keep the same rows after (checked). Last, the old
database is upgraded (the migration step that partitions telemetry_minute, copying the
kept rows): its rows per second say how long the upgrade takes on a big table.

    .venv/bin/python bench/telemetry_minute_retention.py [--devices 500] [--days-kept 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.db import Database, open_database
from controller.db.migrations import migrate
from controller.telemetry.store import METRICS, MIGRATIONS, PARTITIONS_AHEAD, TelemetryStore
from tests.postgres import LocalPostgres, postgres_missing

DAY = 86400


def load(db: Database, devices: int, first_day: int, days: int) -> None:
    """Minute means of `devices` devices for `days` days from `first_day`, in time order
    (as maintenance folds them), made by the server: values vary by device and minute
    but are the same in both databases."""
    values = ", ".join(f"((d * 7 + m / 60 + {i}) % 100)::float8" for i in range(len(METRICS)))
    db.execute(
        f"INSERT INTO telemetry_minute (device_id, minute, n, {', '.join(METRICS)}) "
        f"SELECT 'robot-' || lpad(d::text, 5, '0'), m, 60, {values} "
        f"FROM generate_series({first_day}::bigint, {first_day + days * DAY - 60}::bigint, 60)"
        f" AS m CROSS JOIN generate_series(0, {devices - 1}) AS d"
    )
    db.execute("VACUUM ANALYZE telemetry_minute")


def summary(db: Database) -> tuple[int, float]:
    row = db.execute("SELECT COUNT(*), SUM(cpu_pct) FROM telemetry_minute").fetchone()
    return int(row[0]), float(row[1] or 0.0)


def size_mib(db: Database) -> float:
    """telemetry_minute's tables and indexes on disk (with all its partitions, if any:
    a partitioned table itself has no storage)."""
    row = db.execute(
        "SELECT SUM(pg_total_relation_size(relid)) FROM pg_partition_tree('telemetry_minute')"
    ).fetchone()
    if not row[0]:
        row = db.execute("SELECT pg_total_relation_size('telemetry_minute')").fetchone()
    return float(row[0]) / 2**20


def timed(work: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    work()
    return time.perf_counter() - t0


def old_delete(db: Database, cut: float) -> int:
    """The minute retention of `maintain()` before day partitions, in its transaction."""
    with db.transaction(exclusive=False):
        return int(db.execute("DELETE FROM telemetry_minute WHERE minute < ?", (cut,)).rowcount)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--days-kept", type=int, default=1, choices=range(1, PARTITIONS_AHEAD + 1),
                    help="days of rows after the expiring one")  # fmt: skip
    args = ap.parse_args()
    why = postgres_missing()
    if why:
        print(f"telemetry_minute_retention: {why}", file=sys.stderr)
        return 2
    server = LocalPostgres()
    server.start()
    try:
        run(server, args.devices, args.days_kept)
    finally:
        server.stop()
    return 0


def run(server: LocalPostgres, devices: int, days_kept: int) -> None:
    # The expiring day is today: its partition (and the kept days') exist from the start.
    day = int(time.time() // DAY) * DAY
    new = TelemetryStore(server.create_database())
    old_url = server.create_database()
    old = open_database(old_url)
    migrate(old, "telemetry", MIGRATIONS[:2])  # before minute partitions
    per_day = devices * 1440
    t0 = time.perf_counter()
    for db in (new.conn, old):
        load(db, devices, day, 1 + days_kept)
    print(f"{devices} devices: {per_day:,} rows expire, {per_day * days_kept:,} stay; "
          f"loaded both in {time.perf_counter() - t0:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    sizes = {"new": size_mib(new.conn), "old": size_mib(old)}
    # The cut at the day boundary: retention kept 1 h, `now` 1 h into the next day.
    cut = day + DAY
    counts: dict[str, int] = {}
    t_new = timed(lambda: counts.update(new.maintain(cut + 3600, minute_retention_s=3600)))
    assert counts["minute_partitions_dropped"] == 1 and counts["minute_deleted"] == 0, counts
    v_new = timed(lambda: new.conn.execute("VACUUM telemetry_minute"))
    deleted: list[int] = []
    t_old = timed(lambda: deleted.append(old_delete(old, float(cut))))
    assert deleted == [per_day], deleted
    v_old = timed(lambda: old.execute("VACUUM telemetry_minute"))
    assert summary(new.conn) == summary(old), "the two databases kept different rows"
    after = {"new": size_mib(new.conn), "old": size_mib(old)}
    print(f"{'':34s} {'drop partition':>15s} {'DELETE (before)':>16s}")
    print(f"{'maintain(), minute retention, s':34s} {t_new:15.2f} {t_old:16.2f}")
    print(f"{'VACUUM telemetry_minute, s':34s} {v_new:15.2f} {v_old:16.2f}")
    print(f"{'on disk before, MiB':34s} {sizes['new']:15.0f} {sizes['old']:16.0f}")
    print(f"{'on disk after VACUUM, MiB':34s} {after['new']:15.0f} {after['old']:16.0f}")
    new.close()
    old.close()
    rows = per_day * days_kept
    took = timed(lambda: TelemetryStore(old_url).close())  # the upgrade of the old one
    upgraded = open_database(old_url)
    assert summary(upgraded)[0] == rows, "the upgrade lost or doubled rows"
    upgraded.close()
    print(f"upgrade (partition telemetry_minute): {rows:,} rows in {took:.1f} s, "
          f"{rows / took:,.0f} rows/s; load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
