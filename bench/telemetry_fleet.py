"""Telemetry of a fleet at 1 sample/s into PostgreSQL through two ingesters.

Real parts: a private Mosquitto 2, a private PostgreSQL (tests/postgres.py), two
ingester processes (`controller.telemetry.ingest.TelemetryIngester`, what `jetfleet serve`
runs) in one MQTT 5 shared subscription writing the same database, and `--procs`
publisher processes, each one paho client publishing for its share of the devices, on
each device's own topic, one real `TelemetrySample` per device per second (QoS 0, as the
agent does). A sample's `at` is its publish time and its `uptime_s` its sequence number.

Measured: samples stored per second; lost and duplicated samples counted in the database
(expected devices x seconds against distinct and total (device, at) rows); the delay from
publish to queryable for `--probes` devices (a reader polls the database every 50 ms for
their new rows: each delay is first-seen minus `at`, so an upper bound by up to 50 ms).
`--kill-at S`: one ingester is killed with SIGKILL S seconds into the stream;
`--stop-at S`: one is stopped (what SIGTERM to `jetfleet serve` does) instead.

    .venv/bin/python bench/telemetry_fleet.py --devices 10000 --seconds 60 [--kill-at 30]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import structlog  # noqa: E402

from controller.sandbox.localbroker import LocalMosquitto  # noqa: E402
from protocol.telemetry import TelemetrySample  # noqa: E402

TOPIC = "jetfleet/v1/devices/{}/telemetry"
AT = "2000-01-01T00:00:00.000000Z"


def template(device_id: str) -> tuple[bytes, bytes, bytes]:
    """A real sample split around its `at` and `uptime_s` values (validated once)."""
    doc = TelemetrySample.new(
        device_id=device_id,
        at=AT,
        uptime_s=123456789,
        cpu={"percent": [12.0, 9.5, 30.1, 4.0, 7.7, 15.2], "load1": 1.2, "load5": 0.9},
        mem={"total": 7_990_000_000, "used": 4_100_000_000, "available": 3_890_000_000},
        disk_free_bytes=41_000_000_000,
        temps={"cpu": 51.9, "gpu": 49.1, "soc0": 48.4, "tj": 52.3},
        models={"detector": {"version": "1.4.0", "p50_ms": 3.1, "p99_ms": 7.9, "count": 512}},
    ).encode()
    at = doc.index(b'"2000-01-01T00:00:00')
    at_end = doc.index(b'"', at + 1) + 1
    up = doc.index(b"123456789")
    assert at < up
    return doc[:at], doc[at_end:up], doc[up + 9 :]


def publisher(broker: tuple[str, int], ids: list[str], seconds: int, go: Any, out: Any) -> None:
    import datetime as dt

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    parts = {d: template(d) for d in ids}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{ids[0]}")
    c.max_queued_messages_set(0)
    c.connect(*broker, keepalive=60)
    c.loop_start()
    go.wait()
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    t0 = time.time()
    sent = 0
    for second in range(seconds):
        start = t0 + second
        for i, d in enumerate(ids):
            due = start + i / len(ids)  # spread over the second, as a fleet's clocks are
            delay = due - time.time()
            if delay > 0.002:
                time.sleep(delay)
            now = time.time()
            stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime(
                '"%Y-%m-%dT%H:%M:%S.%fZ"'
            )
            a, b, rest = parts[d]
            payload = a + stamp.encode() + b + str(second).encode() + rest
            c.publish(TOPIC.format(d), payload, qos=0)
            sent += 1
    c.disconnect()
    c.loop_stop()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put((sent, time.time() - t0, ru.ru_utime + ru.ru_stime - cpu0))


def ingester(db: str, broker_url: str, ready: Any, stop: Any) -> None:
    from controller.telemetry.ingest import TelemetryIngester

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    ing = TelemetryIngester(db, broker_url, subscribe_status=False)
    ing.start()
    ready.set()
    stop.wait()
    ing.stop()


def probe(db: str, probes: list[str], stop: Any, out: Any) -> None:
    """Poll the database for the probe devices' new rows; first-seen minus `at`."""
    import psycopg

    conn = psycopg.connect(db, autocommit=True)
    last = 0.0
    seen: set[tuple[str, float]] = set()
    delays: list[float] = []
    while not stop.is_set():
        rows = conn.execute(
            "SELECT device_id, ts FROM telemetry_raw WHERE device_id = ANY(%s) AND ts > %s",
            (probes, last - 5.0),
        ).fetchall()
        now = time.time()
        for d, ts in rows:
            if (d, ts) not in seen:
                seen.add((d, ts))
                delays.append(now - ts)
                last = max(last, ts)
        time.sleep(0.05)
    out.put(delays)


def cpu_s(pid: int | None, tree: bool = False) -> float:
    """User + system CPU seconds of a process (and, with `tree`, its live children)."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if tree else [root]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def count(db: str) -> tuple[int, int]:
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT (device_id, ts)) FROM telemetry_raw"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def settle(db: str, quiet_s: float = 3.0, limit_s: float = 120.0) -> float:
    """Wait until the row count stops moving; returns when it last moved."""
    deadline = time.monotonic() + limit_s
    last, moved = -1, time.time()
    while time.monotonic() < deadline:
        n = count(db)[0]
        if n != last:
            last, moved = n, time.time()
        elif time.time() - moved >= quiet_s:
            break
        time.sleep(0.5)
    return moved


def mark_stored(db: str) -> None:
    """Stamp every raw row with the server's clock as it is written (bench only): the
    delay of every sample, not only the probes', from `at` to its insert."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE telemetry_raw ADD COLUMN stored_at double precision "
            "DEFAULT extract(epoch FROM clock_timestamp())"
        )


def raw_bytes(db: str) -> int:
    """On-disk size of the raw samples: every partition with its indexes and TOAST."""
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
            "WHERE inhparent = 'telemetry_raw'::regclass"
        ).fetchone()
    assert row is not None
    return int(row[0])


def stored_delays(db: str, t0: float) -> tuple[list[float], list[tuple[int, float, float]]]:
    """p50/p99/max of insert minus `at` over every row and the last insert's time; p99
    and max per minute."""
    import psycopg

    q = (
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY stored_at - ts), "
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY stored_at - ts), max(stored_at - ts)"
    )
    with psycopg.connect(db, autocommit=True) as conn:
        whole = conn.execute(f"SELECT {q}, max(stored_at) FROM telemetry_raw").fetchone()
        per_min = conn.execute(
            f"SELECT floor((ts - %s) / 60)::int, {q} FROM telemetry_raw GROUP BY 1 ORDER BY 1",
            (t0,),
        ).fetchall()
    assert whole is not None
    return [float(v) for v in whole], [(int(m), float(b), float(c)) for m, _, b, c in per_min]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--procs", type=int, default=4, help="publisher processes")
    ap.add_argument("--probes", type=int, default=200, help="devices whose delay is measured")
    ap.add_argument("--kill-at", type=float, default=0.0, help="SIGKILL one ingester then")
    ap.add_argument("--stop-at", type=float, default=0.0, help="stop one ingester then")
    args = ap.parse_args()
    from tests.postgres import LocalPostgres

    ids = [f"robot-{i:05d}" for i in range(args.devices)]
    tmp = Path(tempfile.mkdtemp(prefix="telemetry-fleet-"))
    ctx = mp.get_context("spawn")
    server = LocalPostgres()
    server.start()
    try:
        db = server.create_database()
        with LocalMosquitto(tmp / "broker") as broker:
            pstop = ctx.Event()
            # An event each: a process killed while waiting on a shared one can leave its
            # lock held.
            stops = [ctx.Event() for _ in range(2)]
            readies = [ctx.Event() for _ in range(2)]
            ings = [
                ctx.Process(target=ingester, args=(db, broker.url, r, st))
                for r, st in zip(readies, stops, strict=True)
            ]
            for p in ings:
                p.start()
            for r in readies:
                assert r.wait(60), "an ingester did not connect"
            mark_stored(db)
            go, out, pout = ctx.Event(), ctx.Queue(), ctx.Queue()
            chunk = (len(ids) + args.procs - 1) // args.procs
            pubs = [
                ctx.Process(
                    target=publisher,
                    args=((broker.host, broker.port), ids[i : i + chunk], args.seconds, go, out),
                )
                for i in range(0, len(ids), chunk)
            ]
            for p in pubs:
                p.start()
            prober = ctx.Process(
                target=probe, args=(db, ids[:: len(ids) // args.probes][: args.probes], pstop, pout)
            )
            prober.start()
            time.sleep(3.0)  # publishers connected
            # From here on: imports, connects and the schema are not the stream's cost.
            before = {
                "ingesters": sum(cpu_s(p.pid) for p in ings),
                "PostgreSQL": cpu_s(server.proc.pid if server.proc else None, tree=True),
                "Mosquitto": cpu_s(broker.proc.pid if broker.proc else None),
            }
            t0 = time.time()
            go.set()
            killed, killed_cpu = None, 0.0
            if args.kill_at:
                time.sleep(args.kill_at)
                killed = ings[1].pid
                killed_cpu = cpu_s(killed)
                os.kill(killed, signal.SIGKILL)
                print(f"killed ingester {killed} at {time.time() - t0:.1f}s", flush=True)
            elif args.stop_at:
                time.sleep(args.stop_at)
                stops[1].set()
                ings[1].join(60)
                print(f"ingester stopped at {args.stop_at:g}s, gone {time.time() - t0:.1f}s in")
            results = [out.get(timeout=args.seconds * 5 + 120) for _ in pubs]
            last_publish = time.time()
            settle(db)
            cpu = {
                "ingesters": killed_cpu + sum(cpu_s(p.pid) for p in ings if p.pid != killed),
                "PostgreSQL": cpu_s(server.proc.pid if server.proc else None, tree=True),
                "Mosquitto": cpu_s(broker.proc.pid if broker.proc else None),
            }
            cpu = {k: v - before[k] for k, v in cpu.items()}
            pstop.set()
            delays = pout.get(timeout=60)
            total, distinct = count(db)
            whole, per_min = stored_delays(db, t0)
            size = raw_bytes(db)
            for p, st in zip(ings, stops, strict=True):
                # Not the killed one's: a multiprocessing Event's set() waits for every
                # process sleeping on it to wake, and a killed process never does.
                if p.pid != killed:
                    st.set()
            for p in [*ings, *pubs, prober]:
                p.join(30)
    finally:
        server.stop()
    sent = sum(n for n, _, _ in results)
    cpu["publishers"] = sum(c for _, _, c in results)
    # The last insert by the server's clock: settle()'s COUNT(*)s take seconds at millions
    # of rows, so when it saw the count stop is too late.
    span = whole[3] - t0
    print()
    print(
        f"{args.devices} devices x 1 sample/s for {args.seconds} s, {len(pubs)} publisher "
        f"processes, 2 ingesters (MQTT 5 shared subscription) into PostgreSQL"
        + (f"; one ingester SIGKILLed at {args.kill_at:g} s" if killed else "")
        + (f"; one ingester stopped at {args.stop_at:g} s" if args.stop_at else "")
    )
    print(f"published                 {sent} samples in {max(t for _, t, _ in results):.1f} s")
    print(f"stored                    {total} rows, {distinct} distinct (device, at)")
    print(f"lost                      {sent - distinct} ({(sent - distinct) / sent:.3%})")
    print(f"duplicated                {total - distinct}")
    print(f"raw table on disk         {size / 2**20:.0f} MiB ({size / max(total, 1):.0f} B/sample)")
    print(
        f"stored per second         {distinct / span:.0f}/s over {span:.1f} s "
        f"(first publish to last insert; last publish ended {last_publish - t0:.1f} s in)"
    )
    print(
        f"publish -> queryable      p50 {statistics.median(delays):.3f} s, p99 "
        f"{pct(delays, 0.99):.3f} s, max {max(delays):.3f} s over {len(delays)} samples of "
        f"{args.probes} devices (of {args.probes * args.seconds} published; the reader "
        f"polls a 5 s window, so it misses samples later than that)"
    )
    print(
        f"publish -> inserted       p50 {whole[0]:.3f} s, p99 {whole[1]:.3f} s, max "
        f"{whole[2]:.3f} s over all {total} rows (server clock at insert; goal p99 < 2 s)"
    )
    per = 1e6 * cpu["ingesters"] / max(total, 1)
    print(
        f"ingester CPU              {per:.0f} us/sample, {1e6 / per:.0f} samples/s per core "
        f"(both ingesters' user+system over the rows they stored)"
    )
    shares = ", ".join(f"{k} {v:.0f} s ({v / span:.2f} cores)" for k, v in cpu.items())
    print(f"CPU over the run          {shares}")
    minutes = ", ".join(f"{m}: p99 {p:.1f} max {x:.1f}" for m, p, x in per_min)
    print(f"per minute of `at`        {minutes}")


if __name__ == "__main__":
    main()
