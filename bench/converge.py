"""1,000 robots come back at once (a power cut) and converge to their group's release.

Real parts: a Mosquitto broker (controller.sandbox.localbroker), the bundle server
(controller.server.serve.JetfleetServer with its connection cap), an operator-signed release
(protocol.release, Ed25519) published retained. Each simulated device has its own MQTT
connection speaking the agent's protocol: it receives the retained release, verifies it
(verify_release: role, group, signature), waits the agent's jitter (uniform 0..jitter_s,
as agent/desired.py schedules it), downloads the bundle over HTTP (a 503 from the capped
server: back off as told by Retry-After, then again), checks its sha256, "builds" for its
own build time (a sleep: no Jetson here), and publishes its retained status with the new
active version.

The devices are spread over `--procs` worker processes (one Python process would be
bound by its GIL long before the broker or the server is), each running its share as
threads; the broker and the bundle server run in the parent. A device's time counts
from the moment the power comes back (one event for all processes; CLOCK_MONOTONIC is
the same clock in each).

Reported: time to converge per device against its goal (its build time + 60 s), the peak
number of connections the bundle server held at once against its cap (counted by the
server on its event loop as each connection comes: exact, not sampled) and how many it
refused with 503, and the broker's message counters ($SYS, before and after).

    .venv/bin/python bench/converge.py [--devices 1000] [--procs 8] [--cap 32] [--jitter-s 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import init_keys
from controller.server.serve import JetfleetServer, ServeConfig
from protocol.dsse import Envelope
from protocol.messages import DeviceStatus, ModelSlot
from protocol.release import DesiredModel, Release, sign_release, verify_release
from protocol.topics import Topics
from protocol.trust import load_trust_root

T = Topics()
GROUP = "fleet"


def mqtt_client(device: str) -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)


class Device(threading.Thread):
    """One robot: paho's own network thread keeps its session (as the agent's does);
    this thread waits, downloads and "builds"."""

    def __init__(self, n: int, broker: tuple[str, int], trust: Any, args: argparse.Namespace,
                 go: Any) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.id = f"robot-{n:04d}"
        self.broker, self.trust, self.args, self.go = broker, trust, args, go
        self.build_s = random.uniform(args.build_min_s, args.build_max_s)
        self.took: float | None = None
        self.refused = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._converge()
        except Exception as e:  # a bench reports, it does not hide
            self.error = f"{type(e).__name__}: {e}"

    def _converge(self) -> None:
        got: queue.Queue[bytes] = queue.Queue()
        c = mqtt_client(self.id)
        c.on_message = lambda _c, _u, msg: got.put(bytes(msg.payload))
        self.go.wait()
        start = time.monotonic()
        c.connect(*self.broker, keepalive=60)
        c.loop_start()
        try:
            c.subscribe(T.group_release(GROUP), qos=1)
            doc = verify_release(Envelope.decode(got.get(timeout=300)), self.trust, group=GROUP,
                                 now=datetime.now(timezone.utc))  # fmt: skip
            want = doc.models["detector"]
            time.sleep(random.uniform(0.0, self.args.jitter_s))
            data = self._download(want.url)
            if hashlib.sha256(data).hexdigest() != want.sha256:
                raise RuntimeError("bundle sha256 mismatch")
            time.sleep(self.build_s)
            slot = ModelSlot(active=want.version)
            status = DeviceStatus.new(
                device_id=self.id, online=True, groups=[GROUP], models={"detector": slot}
            )
            c.publish(T.status(self.id), status.encode(), qos=1, retain=True).wait_for_publish(60)
            self.took = time.monotonic() - start
        finally:
            c.disconnect()
            c.loop_stop()

    def _download(self, url: str) -> bytes:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    return bytes(r.read())
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    raise
                self.refused += 1
                wait = float(e.headers.get("Retry-After") or 5) * random.uniform(0.5, 1.0)
            except (ConnectionError, urllib.error.URLError):
                self.refused += 1
                wait = random.uniform(0.5, 2.0)
            time.sleep(wait)


def worker(first: int, n: int, broker: tuple[str, int], trust_envelope: bytes,
           args: argparse.Namespace, go: Any, ready: Any, results: Any) -> None:  # fmt: skip
    """One process's share of the fleet: devices first..first+n-1, started and waiting for
    the power to come back; each one's outcome goes back on `results`."""
    trust = load_trust_root(trust_envelope, datetime.now(timezone.utc))
    devices = [Device(i, broker, trust, args, go) for i in range(first, first + n)]
    for d in devices:
        d.start()
    ready.set()
    for d in devices:
        d.join(args.jitter_s + args.build_max_s + 900)
    results.put([(d.id, d.took, d.build_s, d.refused, d.error) for d in devices])


def sys_counters(broker: LocalMosquitto) -> dict[str, int]:
    got: dict[str, int] = {}
    c = mqtt_client("bench-sys")
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic, int(m.payload))
    c.connect(broker.host, broker.port)
    c.subscribe("$SYS/broker/messages/#")
    deadline = time.monotonic() + 15
    while len(got) < 3 and time.monotonic() < deadline:
        c.loop(timeout=0.2)
    c.disconnect()
    return got


def main() -> int:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=8, help="worker processes the devices share")
    ap.add_argument("--cap", type=int, default=32, help="the bundle server's max_connections")
    ap.add_argument("--jitter-s", type=float, default=30.0)
    ap.add_argument("--bundle-mb", type=float, default=4.0)
    ap.add_argument("--build-min-s", type=float, default=5.0)
    ap.add_argument("--build-max-s", type=float, default=20.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jetfleet-converge-"))
    keys = init_keys(work / "keys")
    bundle_dir = work / "bundles"
    bundle_dir.mkdir()
    blob = os.urandom(int(args.bundle_mb * (1 << 20)))
    (bundle_dir / "detector-2.0.0.jfb").write_bytes(blob)
    with LocalMosquitto(work / "broker") as broker:
        server = JetfleetServer(ServeConfig(
            broker=broker.url, telemetry_db=work / "t.db", bundle_dir=bundle_dir,
            data_dir=work, host="127.0.0.1", http_port=0, ingest=False,
            max_connections=args.cap))  # fmt: skip
        state = server.start()
        port = int(state.bundle_url_base.rsplit(":", 1)[1].split("/")[0])
        want = DesiredModel(version="2.0.0", sha256=hashlib.sha256(blob).hexdigest(),
                            url=f"http://127.0.0.1:{port}/bundles/detector-2.0.0.jfb",
                            size=len(blob))  # fmt: skip
        rel = Release.new(group=GROUP, version=1, issued_at=datetime.now(timezone.utc),
                          models={"detector": want})  # fmt: skip
        pub = mqtt_client("bench-operator")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        pub.publish(T.group_release(GROUP), sign_release(rel, [keys.operator]).encode(),
                    qos=1, retain=True).wait_for_publish()  # fmt: skip
        pub.loop_stop()
        pub.disconnect()
        before = sys_counters(broker)
        ctx = mp.get_context("spawn")
        go, results = ctx.Event(), ctx.Queue()
        share = [args.devices // args.procs + (i < args.devices % args.procs)
                 for i in range(args.procs)]  # fmt: skip
        procs, first = [], 0
        for n in share:
            ready = ctx.Event()
            share_args = (first, n, (broker.host, broker.port), keys.trust_envelope, args)
            p = ctx.Process(target=worker, args=(*share_args, go, ready, results), daemon=True)
            p.start()
            procs.append((p, ready))
            first += n
        for p, ready in procs:
            if not ready.wait(300):
                raise SystemExit(f"worker {p.pid} did not start its devices")
        started = time.monotonic()
        go.set()  # the power comes back
        outcomes = [o for _ in procs for o in results.get(timeout=args.jitter_s + 1800)]
        wall = time.monotonic() - started
        for p, _ in procs:
            p.join(30)
        time.sleep(11)  # $SYS counters update every 10 s
        after = sys_counters(broker)
        server.stop()
    took = {i: (t, b) for i, t, b, _, _ in outcomes if t is not None}
    done = [t for t, _ in took.values()]
    over = [t - b for t, b in took.values()]
    late = [i for i, (t, b) in took.items() if t > b + 60]
    result = {
        "devices": args.devices,
        "processes": args.procs,
        "converged": len(done),
        "errors": sorted({e for *_, e in outcomes if e})[:5],
        "wall_s": round(wall, 1),
        "converge_s_median": round(statistics.median(done), 1) if done else None,
        "converge_s_max": round(max(done), 1) if done else None,
        "beyond_build_s_median": round(statistics.median(over), 1) if over else None,
        "beyond_build_s_max": round(max(over), 1) if over else None,
        "over_goal (build + 60 s)": len(late),
        "cap": args.cap,
        "peak_concurrent_downloads": server.http.connections.peak,
        "server_refused_503": server.http.connections.refused,
        "refused_503_or_reset": sum(r for _, _, _, r, _ in outcomes),
        "broker_messages": {
            k.rsplit("/", 1)[-1]: after.get(k, 0) - before.get(k, 0) for k in after
        },
    }
    print(json.dumps(result, indent=2))
    peak = server.http.connections.peak
    return 0 if len(done) == args.devices and not late and peak <= args.cap else 1


if __name__ == "__main__":
    raise SystemExit(main())
