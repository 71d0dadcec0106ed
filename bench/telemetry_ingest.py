"""Telemetry ingestion throughput: samples/s stored in SQLite vs what mosquitto_sub drains.

One private Mosquitto. Two consumers subscribe to the same stream at the same time: the
ingester (`controller.telemetry.ingest.TelemetryIngester`, in this process, writing SQLite) and
`mosquitto_sub` (C, prints and forgets: the broker's own delivery rate, the baseline).
A publisher process floods real TelemetrySample payloads of N devices, QoS 0, as fast as
it can. Each consumer's rate is messages / (last arrival - first arrival); for the
ingester, "arrival" is the commit to SQLite. Repeated `--runs` times; medians printed.

    .venv/bin/python bench/telemetry_ingest.py [--devices 1000] [--samples 200000] [--runs 3]

Goal (issue 6): >= 20,000 samples/s stored, and >= 0.8 of mosquitto_sub's rate.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import structlog

from controller.sandbox.localbroker import LocalMosquitto
from controller.telemetry.ingest import IngestPool
from controller.telemetry.store import TelemetryStore
from protocol.telemetry import TelemetrySample

TOPIC = "jetfleet/v1/devices/{}/telemetry"


def sample_payload(device_id: str, i: int) -> bytes:
    """A realistic Orin-class sample (~700 bytes), as the agent encodes it."""
    return TelemetrySample.new(
        device_id=device_id,
        at=f"2026-11-25T07:{(i // 60) % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
        uptime_s=1000 + i,
        cpu={"percent": [12.0, 9.5, 30.1, 4.0, 7.7, 15.2], "load1": 1.2, "load5": 0.9},
        mem={"total": 7_990_000_000, "used": 4_100_000_000, "available": 3_890_000_000},
        disk_free_bytes=41_000_000_000,
        temps={"cpu": 51.9, "gpu": 49.1, "soc0": 48.4, "tj": 52.3},
        gpu={
            "source": "tegrastats",
            "name": "NVIDIA Jetson Orin Nano Developer Kit",
            "load_pct": float(i % 100),
            "freq_mhz": 624.0,
            "emc_pct": 18.0,
            "emc_freq_mhz": 3199.0,
            "power_mw": {"VDD_IN": 7946.0, "VDD_CPU_GPU_CV": 2896.0, "VDD_SOC": 1923.0},
            "nvpmodel": "15W",
            "temp_c": 49.1,
        },
        models={"detector": {"version": "1.4.0", "p50_ms": 3.1, "p99_ms": 7.9, "count": 512}},
        jobs={"done": 7, "failed": 0},
    ).encode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish_packet(topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    body = len(t).to_bytes(2, "big") + t + payload
    return b"\x30" + _varint(len(body)) + body


def publisher(host: str, port: int, packets_file: str, ready: Any, go: Any, done: Any) -> None:
    """A bare MQTT 3.1.1 client: CONNECT, then the pre-encoded PUBLISH stream, QoS 0."""
    data = Path(packets_file).read_bytes()
    s = socket.create_connection((host, port))
    cid = b"bench-publisher"
    var = b"\x00\x04MQTT\x04\x02\x00\x3c"
    body = var + len(cid).to_bytes(2, "big") + cid
    s.sendall(b"\x10" + _varint(len(body)) + body)
    assert s.recv(4)[:2] == b"\x20\x02", "no CONNACK"
    ready.set()
    go.wait()
    t0 = time.perf_counter()
    view = memoryview(data)
    for off in range(0, len(data), 1 << 20):
        s.sendall(view[off : off + (1 << 20)])
    done.value = time.perf_counter() - t0
    s.sendall(b"\xe0\x00")  # DISCONNECT
    s.close()


class SubCounter:
    """mosquitto_sub printing only each message's arrival time (`-F %U`, its own clock
    reading, in ns) to a file: no pipe for this process to drain, no GIL taken from the
    ingester."""

    def __init__(self, host: str, port: int, out: Path) -> None:
        self.out = out
        self._fh = out.open("wb")
        argv = ["mosquitto_sub", "-h", host, "-p", str(port), "-q", "0", "-F", "%U"]
        self.proc = subprocess.Popen(
            [*argv, "-t", TOPIC.format("+")],
            stdout=self._fh,
            stderr=subprocess.DEVNULL,
        )

    def lines(self) -> int:
        return self.out.stat().st_size // 21  # "1795591054.719060214\n"

    def stop(self) -> tuple[int, float, float]:
        self.proc.terminate()
        self.proc.wait()
        self._fh.close()
        stamps = self.out.read_text().split()
        if not stamps:
            return 0, 0.0, 0.0
        return len(stamps), float(stamps[0]), float(stamps[-1])


@contextlib.contextmanager
def as_shipped() -> Iterator[None]:
    """The ingester without its three optimisations, for the side-by-side baseline (one
    process only: spawned workers would not see these patches): paho's own
    loop_forever(), paho decoding every MQTT 5 PUBLISH with its stock Properties, and
    SQLite rows written with executemany()."""
    import controller.telemetry.ingest as ingest
    from controller.telemetry import paho_speedups

    def executemany(self, table, columns, rows, suffix=""):
        one = "(" + ", ".join("?" * len(columns)) + ")"
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {one}{suffix}"
        self.conn.executemany(sql, rows)

    def loop_forever(self):
        self.client.loop_forever()

    # The baseline swaps the ingester's own internals for what they replaced.
    saved = (
        paho_speedups.installed(),
        paho_speedups.install,
        TelemetryStore._insert_many,  # noqa: SLF001
        ingest.TelemetryIngester._net_loop,  # noqa: SLF001
    )
    paho_speedups.uninstall()
    paho_speedups.install = lambda: False
    TelemetryStore._insert_many = executemany  # noqa: SLF001
    ingest.TelemetryIngester._net_loop = loop_forever  # noqa: SLF001
    try:
        yield
    finally:
        paho_speedups.install = saved[1]
        if saved[0]:
            paho_speedups.install()
        TelemetryStore._insert_many = saved[2]  # noqa: SLF001
        ingest.TelemetryIngester._net_loop = saved[3]  # noqa: SLF001


def one_run(args: argparse.Namespace, workdir: Path, packets_file: Path, total: int) -> dict:
    conf = "\n".join(
        [
            f"user {getpass.getuser()}",
            "allow_anonymous true",
            "persistence false",
            # QoS 0 to a slow online subscriber is queued, not dropped, so both
            # consumers see the whole stream and we measure drain rates.
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "log_dest none",
        ]
    )
    db = workdir / "telemetry.db"
    for p in workdir.glob("telemetry.db*"):
        p.unlink()
    with LocalMosquitto(workdir / "broker", extra_config=conf) as broker:
        ing = IngestPool(args.workers, db, broker.url, maintenance_interval_s=3600)
        ing.start()
        sub = SubCounter(broker.host, broker.port, workdir / "sub.txt")
        first_in, cpu0 = [0.0], [0.0]
        orig = ing.main._on_message  # noqa: SLF001 - the bench stamps the first sample
        workers = ing._procs  # noqa: SLF001 - their CPU counts too
        cpu_of = [psutil.Process()] + [psutil.Process(p.pid) for p in workers]

        def ingest_cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in cpu_of)

        def stamped(c, u, m):  # the stream's first sample, as this process sees it
            if not first_in[0]:
                first_in[0] = time.time()
            orig(c, u, m)

        ing.main.client.on_message = stamped
        time.sleep(0.5)  # both subscriptions in place
        ctx = mp.get_context("spawn")
        ready, go, done = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
        pub = ctx.Process(
            target=publisher, args=(broker.host, broker.port, str(packets_file), ready, go, done)
        )
        pub.start()
        ready.wait(30)
        procs = {
            "mosquitto": psutil.Process(broker.proc.pid),
            "mosquitto_sub": psutil.Process(sub.proc.pid),
        }
        cpu_before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
        cpu0[0] = ingest_cpu()
        wall0 = time.time()
        go.set()
        last_stored, last_t, last_change = 0, 0.0, time.time()
        while True:
            time.sleep(0.02)
            now = time.time()
            s = ing.stats.stored
            if s != last_stored:
                last_stored, last_t, last_change = s, now, now
            # A stall: nothing new stored for 30 s (the baseline's batches can take long).
            if (s >= total and sub.lines() >= total) or now - last_change > 30.0:
                break
        cpu = ingest_cpu() - cpu0[0]
        wall = time.time() - wall0
        others = {k: (sum(p.cpu_times()[:2]) - cpu_before[k]) / wall for k, p in procs.items()}
        pub.join()
        time.sleep(0.2)
        sub_count, sub_first, sub_last = sub.stop()
        ing.stop()
        stats = ing.stats.snapshot()
    store = TelemetryStore(db, readonly=True)
    in_db = store.count_raw()
    store.close()
    ing_rate = last_stored / (last_t - first_in[0]) if last_t > first_in[0] else 0.0
    sub_rate = sub_count / (sub_last - sub_first) if sub_last > sub_first else 0.0
    return {
        "published": total,
        "publish_s": done.value,
        "publish_rate": total / done.value if done.value else 0.0,
        "stored": last_stored,
        "in_db": in_db,
        "ingester_rate": ing_rate,
        "sub_received": sub_count,
        "ingester_cpu_us": cpu / last_stored * 1e6 if last_stored else 0.0,
        "cores_used": {"ingester": cpu / wall, **others},
        "sub_rate": sub_rate,
        "ratio": ing_rate / sub_rate if sub_rate else 0.0,
        "dropped": stats["dropped"],
        "batches": stats["batches"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=200_000, help="messages per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--workers", type=int, default=1, help="ingester processes (MQTT 5 shared subscription)"
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="alternate runs of the ingester as shipped (no paho speedup, executemany) "
        "and as built, one worker, and print both medians",
    )
    ap.add_argument("--json", action="store_true", help="print the per-run figures as JSON")
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory(prefix="jf-bench-") as tmp:
        workdir = Path(tmp)
        payloads = [sample_payload(f"robot-{d:05d}", d) for d in range(args.devices)]
        packets = bytearray()
        for i in range(args.samples):
            d = i % args.devices
            packets += _publish_packet(TOPIC.format(f"robot-{d:05d}"), payloads[d])
        packets_file = workdir / "packets.bin"
        packets_file.write_bytes(packets)
        print(
            f"{args.samples} samples of {args.devices} devices, "
            f"{len(payloads[0])} bytes each, {len(packets) / 1e6:.0f} MB per run, "
            f"{os.cpu_count()} CPUs, {args.workers} ingest worker(s)"
        )
        variants = ["baseline", "optimized"] if args.compare else ["optimized"]
        if args.compare:
            args.workers = 1
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(args.runs):
            for v in variants:
                with as_shipped() if v == "baseline" else contextlib.nullcontext():
                    res = one_run(args, workdir, packets_file, args.samples)
                runs[v].append(res)
                print(
                    f"run {r + 1} {v}: publisher {res['publish_rate']:,.0f}/s | "
                    f"mosquitto_sub {res['sub_rate']:,.0f}/s ({res['sub_received']}) | "
                    f"ingester stored {res['ingester_rate']:,.0f}/s ({res['stored']}, "
                    f"{res['in_db']} rows in db, {res['batches']} batches, "
                    f"{res['ingester_cpu_us']:.0f} µs CPU each) | "
                    f"ratio {res['ratio']:.2f} | dropped {res['dropped'] or 0} | cores busy: "
                    + ", ".join(f"{k} {val:.2f}" for k, val in res["cores_used"].items()),
                    flush=True,
                )
        medians = {}
        for v, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("ingester_rate", "sub_rate")}
            ratio = statistics.median(r["ratio"] for r in rs)
            medians[v] = med["ingester_rate"]
            print(
                f"median {v}: ingester {med['ingester_rate']:,.0f} samples/s stored, "
                f"mosquitto_sub {med['sub_rate']:,.0f}/s, ratio {ratio:.2f} "
                f"(goal >= 20,000/s and >= 0.80)"
            )
        if args.compare and medians["baseline"]:
            print(f"optimized / baseline: {medians['optimized'] / medians['baseline']:.2f}x")
        if args.json:
            print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
