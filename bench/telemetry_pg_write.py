"""Telemetry writes into PostgreSQL: COPY (as built) against multi-row INSERT (before).

The ingester's writer thread stores each batch in one transaction: the raw rows, and the
newest row per device as `device_latest`. On PostgreSQL the raw rows now go in by COPY
FROM STDIN (controller/db `copy_rows`); before, by the multi-row INSERTs SQLite uses.
This bench times `TelemetryStore.insert_batch` both ways, alternating, on the same
private PostgreSQL server (the tests' `LocalPostgres`: fsync off, so it measures the
client and server CPU per row, not a disk), with real `TelemetrySample` rows of N devices
in batches of the size the ingester writes. It reports the medians of µs of wall time
and of this process's CPU per row, and their ratio.

    .venv/bin/python bench/telemetry_pg_write.py [--rows 200000] [--batch 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.telemetry.store import TelemetryStore, row_from_sample
from protocol.telemetry import TelemetrySample
from tests.postgres import LocalPostgres, postgres_missing


def rows_of(devices: int, count: int, start: float) -> list[tuple]:
    """`count` rows of `devices` robots, one sample per robot per second from `start`."""
    out = []
    for i in range(count):
        s = TelemetrySample.new(
            device_id=f"robot-{i % devices:05d}",
            at=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + i // devices)) + "Z",
            uptime_s=1000 + i,
            cpu={"percent": [12.0, 9.5, 30.1, 4.0, 7.7, 15.2], "load1": 1.2},
            mem={"total": 7_990_000_000, "used": 4_100_000_000, "available": 3_890_000_000},
            temps={"cpu": 51.9, "gpu": 49.1, "tj": 52.3},
            gpu={"source": "tegrastats", "load_pct": float(i % 100), "freq_mhz": 624.0},
        )
        out.append(row_from_sample(s, s.encode().decode()))
    return out


@contextlib.contextmanager
def as_before(store: TelemetryStore) -> Iterator[None]:
    """The store writing its raw rows by multi-row INSERT, as before COPY (the baseline)."""
    conn = store.conn
    before = conn.copy_rows

    def by_insert(table: str, columns: object, rows: list[tuple]) -> None:
        store._insert_many(table, columns, rows)  # type: ignore[arg-type]  # noqa: SLF001 - the baseline path

    conn.copy_rows = by_insert  # type: ignore[method-assign]
    try:
        yield
    finally:
        conn.copy_rows = before  # type: ignore[method-assign]


def timed(store: TelemetryStore, rows: list[tuple], batch: int) -> tuple[float, float]:
    """(µs of wall time per row, µs of this process's CPU per row) to store `rows`."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, len(rows), batch):
        store.insert_batch(rows[i : i + batch])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall / len(rows) * 1e6, cpu / len(rows) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows per run and way")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=2000, help="rows per insert_batch")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    why = postgres_missing()
    if why:
        print(f"telemetry_pg_write: {why}", file=sys.stderr)
        return 2
    server = LocalPostgres()
    server.start()
    try:
        store = TelemetryStore(server.create_database())
        day = int(time.time() // 86400) * 86400 + 3600  # inside today's partition
        rows = rows_of(args.devices, args.rows, day)
        print(f"{args.rows} rows of {args.devices} devices per run, batches of {args.batch}")
        got: dict[str, list[tuple[float, float]]] = {"insert": [], "copy": []}
        for run in range(args.runs):
            for way in ("insert", "copy") if run % 2 == 0 else ("copy", "insert"):
                store.conn.execute("TRUNCATE telemetry_raw, device_latest")
                with as_before(store) if way == "insert" else contextlib.nullcontext():
                    got[way].append(timed(store, rows, args.batch))
                assert store.count_raw() == args.rows, "rows lost or doubled"
                wall, cpu = got[way][-1]
                print(f"run {run + 1} {way:6s} {wall:6.1f} µs/row wall, {cpu:6.1f} µs/row CPU")
        med = {w: [statistics.median(v[i] for v in got[w]) for i in (0, 1)] for w in got}
        for w, (wall, cpu) in med.items():
            print(f"median {w:6s} {wall:6.1f} µs/row wall ({1e6 / wall:,.0f} rows/s), "
                  f"{cpu:6.1f} µs/row client CPU")  # fmt: skip
        print(f"COPY / INSERT: wall {med['copy'][0] / med['insert'][0]:.2f}, "
              f"client CPU {med['copy'][1] / med['insert'][1]:.2f}")  # fmt: skip
        store.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
