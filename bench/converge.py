"""1,000 robots come back at once (a power cut) and converge to their group's release.

Real parts: a Mosquitto broker (controller.sandbox.localbroker), the bundle server
(controller.server.serve.JetfleetServer with its connection cap), an operator-signed release
(protocol.release, Ed25519) published retained. Each simulated device is a thread with
its own MQTT connection speaking the agent's protocol: it receives the retained release,
verifies it (verify_release: role, group, signature), waits the agent's jitter (uniform
0..jitter_s, as agent/desired.py schedules it), downloads the bundle over HTTP (a 503 from
the capped server: back off as told by Retry-After, then again), checks its sha256,
"builds" for its own build time (a sleep: no Jetson here), and publishes its retained
status with the new active version.

Reported: time to converge per device against its goal (its build time + 60 s), the peak
number of download connections the server held at once against its cap (the server's
handler threads, one per held connection, not counted by the clients), and the broker's
message counters ($SYS, before and after).

    .venv/bin/python bench/converge.py [--devices 1000] [--cap 32] [--jitter-s 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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

T = Topics()
GROUP = "fleet"


def mqtt_client(device: str) -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=paho.MQTTv5)


class Device(threading.Thread):
    def __init__(self, n: int, broker: LocalMosquitto, trust: Any, args: argparse.Namespace,
                 go: threading.Event) -> None:  # fmt: skip
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
        got: list[bytes] = []
        c = mqtt_client(self.id)
        c.on_message = lambda _c, _u, msg: got.append(bytes(msg.payload))
        self.go.wait()
        start = time.monotonic()
        c.connect(self.broker.host, self.broker.port, keepalive=60)
        c.subscribe(T.group_release(GROUP), qos=1)
        while not got:
            c.loop(timeout=0.1)
        doc = verify_release(Envelope.decode(got[0]), self.trust, group=GROUP,
                             now=datetime.now(timezone.utc))  # fmt: skip
        want = doc.models["detector"]
        deadline = time.monotonic() + random.uniform(0.0, self.args.jitter_s)
        while time.monotonic() < deadline:
            c.loop(timeout=0.2)
        data = self._download(want.url, c)
        if hashlib.sha256(data).hexdigest() != want.sha256:
            raise RuntimeError("bundle sha256 mismatch")
        end = time.monotonic() + self.build_s
        while time.monotonic() < end:
            c.loop(timeout=0.2)
        status = DeviceStatus.new(device_id=self.id, online=True, groups=[GROUP],
                                  models={"detector": ModelSlot(active=want.version)})  # fmt: skip
        info = c.publish(T.status(self.id), status.encode(), qos=1, retain=True)
        while not info.is_published():
            c.loop(timeout=0.1)
        self.took = time.monotonic() - start
        c.disconnect()

    def _download(self, url: str, c: paho.Client) -> bytes:
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
            until = time.monotonic() + wait
            while time.monotonic() < until:
                c.loop(timeout=0.2)


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


def peak_sampler(stop: threading.Event, out: list[int]) -> None:
    """Connections the bundle server holds at once: its handler threads (one per accepted
    connection, each holding one of its `max_connections` slots; a refused one gets its
    503 without a thread)."""
    while not stop.is_set():
        out.append(sum(1 for t in threading.enumerate() if "process_request" in t.name))
        time.sleep(0.01)


def main() -> int:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--cap", type=int, default=32, help="the bundle server's max_connections")
    ap.add_argument("--jitter-s", type=float, default=30.0)
    ap.add_argument("--bundle-mb", type=float, default=4.0)
    ap.add_argument("--build-min-s", type=float, default=5.0)
    ap.add_argument("--build-max-s", type=float, default=20.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jetfleet-converge-"))
    keys = init_keys(work / "keys")
    trust = keys.trust
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
        go = threading.Event()
        devices = [Device(i, broker, trust, args, go) for i in range(args.devices)]
        for d in devices:
            d.start()
        stop, samples = threading.Event(), [0]
        sampler = threading.Thread(target=peak_sampler, args=(stop, samples), daemon=True)
        sampler.start()
        started = time.monotonic()
        go.set()  # the power comes back
        for d in devices:
            d.join(args.jitter_s + args.build_max_s + 600)
        wall = time.monotonic() - started
        stop.set()
        sampler.join()
        time.sleep(11)  # $SYS counters update every 10 s
        after = sys_counters(broker)
        server.stop()
    took = {d.id: (d.took, d.build_s) for d in devices if d.took is not None}
    done = [t for t, _ in took.values()]
    over = [t - b for t, b in took.values()]
    late = [i for i, (t, b) in took.items() if t > b + 60]
    result = {
        "devices": args.devices,
        "converged": len(done),
        "errors": sorted({d.error for d in devices if d.error})[:5],
        "wall_s": round(wall, 1),
        "converge_s_median": round(statistics.median(done), 1) if done else None,
        "converge_s_max": round(max(done), 1) if done else None,
        "beyond_build_s_median": round(statistics.median(over), 1) if over else None,
        "beyond_build_s_max": round(max(over), 1) if over else None,
        "over_goal (build + 60 s)": len(late),
        "cap": args.cap,
        "peak_concurrent_downloads": max(samples),
        "refused_503_or_reset": sum(d.refused for d in devices),
        "broker_messages": {
            k.rsplit("/", 1)[-1]: after.get(k, 0) - before.get(k, 0) for k in after
        },
    }
    print(json.dumps(result, indent=2))
    return 0 if len(done) == args.devices and not late and max(samples) <= args.cap else 1


if __name__ == "__main__":
    raise SystemExit(main())
