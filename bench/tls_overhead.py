"""What mutual TLS and the per-device ACL cost, against plain MQTT, side by side.

Two Mosquitto 2 brokers run at once on loopback: the baseline (plain TCP, anonymous, no
ACL) and the configuration `jetfleet broker config` generates (mutual TLS with the fleet
PKI, ECDSA P-256, TLS 1.3, per-device ACL). Every measure alternates between the two so
both see the same machine load:

1. connect: TCP + TLS handshake + CONNECT/CONNACK of a device client (paho), ms;
2. command round trip: controller publishes a 1 KiB command (QoS 1) to a device's cmd
   topic, the device's client receives it; one at a time, ms;
3. event throughput: a device publishes a burst of 1 KiB QoS 1 events to its own events
   topic, the controller's subscription receives them all; messages/s.

    .venv/bin/python bench/tls_overhead.py --connects 200 --roundtrips 2000 --burst 5000
"""

from __future__ import annotations

import argparse
import getpass
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.sandbox.localbroker import LocalMosquitto, find_mosquitto, free_port, wait_for_port  # noqa: E402
from controller.security import brokerconfig, pki  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from protocol.transport import client_tls_context  # noqa: E402

T = Topics()
PAYLOAD = b"x" * 1024


class Side:
    """One broker and how to reach it as a given identity."""

    def __init__(self, name: str, port: int, tls: dict[str, ssl.SSLContext] | None) -> None:
        self.name, self.port, self.tls = name, port, tls

    def client(self, identity: str, client_id: str = "") -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if self.tls is not None:
            c.tls_set_context(self.tls[identity])
        return c


def connect_wait(c: mqtt.Client, port: int) -> None:
    done = threading.Event()
    c.on_connect = lambda *a: done.set()
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not done.wait(10):
        raise RuntimeError(f"no CONNACK from port {port}")


def time_connect(side: Side) -> float:
    c = side.client("robot-a")
    t0 = time.perf_counter()
    connect_wait(c, side.port)
    dt = (time.perf_counter() - t0) * 1000
    c.disconnect()
    c.loop_stop()
    return dt


class RoundTrip:
    def __init__(self, side: Side) -> None:
        self.got = threading.Event()
        self.dev = side.client("robot-a")
        self.dev.on_message = lambda *a: self.got.set()
        connect_wait(self.dev, side.port)
        subscribed = threading.Event()
        self.dev.on_subscribe = lambda *a: subscribed.set()
        self.dev.subscribe(T.device_cmd("robot-a"), 1)
        subscribed.wait(5)
        self.ctl = side.client("controller")
        connect_wait(self.ctl, side.port)

    def once(self) -> float:
        self.got.clear()
        t0 = time.perf_counter()
        self.ctl.publish(T.device_cmd("robot-a"), PAYLOAD, qos=1)
        if not self.got.wait(10):
            raise RuntimeError("command not delivered")
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        for c in (self.dev, self.ctl):
            c.disconnect()
            c.loop_stop()


def burst(side: Side, n: int) -> float:
    received = 0
    done = threading.Event()
    lock = threading.Lock()

    def on_message(*a: object) -> None:
        nonlocal received
        with lock:
            received += 1
            if received == n:
                done.set()

    ctl = side.client("controller")
    ctl.on_message = on_message
    connect_wait(ctl, side.port)
    subscribed = threading.Event()
    ctl.on_subscribe = lambda *a: subscribed.set()
    ctl.subscribe(T.events("robot-a"), 1)
    subscribed.wait(5)
    dev = side.client("robot-a")
    dev.max_inflight_messages_set(100)
    connect_wait(dev, side.port)
    t0 = time.perf_counter()
    for _ in range(n):
        dev.publish(T.events("robot-a"), PAYLOAD, qos=1)
    if not done.wait(120):
        raise RuntimeError(f"only {received}/{n} events arrived")
    rate = n / (time.perf_counter() - t0)
    for c in (dev, ctl):
        c.disconnect()
        c.loop_stop()
    return rate


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=200)
    ap.add_argument("--roundtrips", type=int, default=2000)
    ap.add_argument("--burst", type=int, default=5000)
    ap.add_argument("--bursts", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jetfleet-tls-bench-"))
    root = work / "pki"
    pki.init_ca(root)
    certs = {
        "robot-a": pki.issue_device(root, "robot-a"),
        "controller": pki.issue_controller(root),
    }
    pki.issue_server(root, ["127.0.0.1"])
    tls_port = free_port()
    (work / "persist").mkdir()
    files = brokerconfig.write_broker_config(
        work / "etc", root, port=tls_port, bind="127.0.0.1", data_dir=work / "persist",
        run_as=getpass.getuser(),
    )  # fmt: skip
    import subprocess

    tls_proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(files.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    plain = LocalMosquitto(work / "plain")
    plain.start()
    try:
        wait_for_port("127.0.0.1", tls_port)
        contexts = {
            n: client_tls_context(str(c.ca), str(c.cert), str(c.key)) for n, c in certs.items()
        }
        sides = [Side("plain", plain.port, None), Side("mtls+acl", tls_port, contexts)]
        print(f"TLS version: {contexts['robot-a'].maximum_version.name} max; "
              f"mosquitto: {find_mosquitto()}")  # fmt: skip

        conn: dict[str, list[float]] = {s.name: [] for s in sides}
        for _ in range(args.connects):
            for s in sides:
                conn[s.name].append(time_connect(s))

        rts = {s.name: RoundTrip(s) for s in sides}
        rt: dict[str, list[float]] = {s.name: [] for s in sides}
        for _ in range(args.roundtrips):
            for s in sides:
                rt[s.name].append(rts[s.name].once())
        for r in rts.values():
            r.close()

        thr: dict[str, list[float]] = {s.name: [] for s in sides}
        for _ in range(args.bursts):
            for s in sides:
                thr[s.name].append(burst(s, args.burst))

        print(f"\n{'measure':<42}{'plain':>12}{'mtls+acl':>12}{'ratio':>8}")
        for label, data, q in (
            (f"connect p50 ms (n={args.connects})", conn, 0.5),
            ("connect p99 ms", conn, 0.99),
            (f"1 KiB command round trip p50 ms (n={args.roundtrips})", rt, 0.5),
            ("1 KiB command round trip p99 ms", rt, 0.99),
        ):
            a, b = pct(data["plain"], q), pct(data["mtls+acl"], q)
            print(f"{label:<42}{a:>12.2f}{b:>12.2f}{b / a:>8.2f}")
        a, b = statistics.median(thr["plain"]), statistics.median(thr["mtls+acl"])
        print(f"{'1 KiB QoS 1 events/s, median of ' + str(args.bursts):<42}{a:>12.0f}{b:>12.0f}"
              f"{b / a:>8.2f}")  # fmt: skip
        print(f"  bursts plain {[round(x) for x in thr['plain']]}, "
              f"mtls+acl {[round(x) for x in thr['mtls+acl']]}")  # fmt: skip
    finally:
        plain.stop()
        tls_proc.terminate()
        tls_proc.wait(10)


if __name__ == "__main__":
    main()
