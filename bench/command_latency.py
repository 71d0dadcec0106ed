"""Command latency and idle footprint of the real agent on loopback.

1. publish-to-RECEIVED: a signed ping is published (QoS 1) to the device's command topic
   and the clock stops when the agent's RECEIVED event arrives. Measured one command at a
   time, interleaved with the broker's own round trip (a paho publisher → paho subscriber
   pair, QoS 1, same broker, same message size), so both see the same machine load.
   Goal: agent p99 < 20 ms and < 5x the broker's own p99.
2. Idle footprint: the agent with telemetry at 1 Hz, sampled for --idle-s seconds after
   the commands: RSS (max) and CPU (process user+system time / wall time).
   Goal: RSS < 60 MiB, CPU < 1% of a core.

    .venv/bin/python bench/command_latency.py --commands 1000 --idle-s 60
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.sandbox.localbroker import LocalMosquitto  # noqa: E402
from protocol.keys import SigningKey  # noqa: E402
from protocol.messages import JobEvent  # noqa: E402
from protocol.topics import Topics  # noqa: E402
from protocol.trust import build_trust_root  # noqa: E402
from tests.agent.harness import (  # noqa: E402
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    make_command,
    sign_command,
    write_agent_config,
)

DEV = "bench-robot"


class BenchMosquitto(LocalMosquitto):
    """The project's local Mosquitto, optionally with `set_tcp_nodelay true` (Mosquitto's
    default is false: it then holds a second small message for the client's delayed ACK,
    40 ms on Linux, which is what a latency-minded fleet broker turns off)."""

    def __init__(self, workdir: Path, nodelay: bool) -> None:
        super().__init__(workdir)
        self.nodelay = nodelay

    def write_config(self) -> None:
        super().write_config()
        if self.nodelay:
            with self.config_path.open("a") as f:
                f.write("set_tcp_nodelay true\n")


def nodelay(client: mqtt.Client) -> None:
    def on_socket_open(c: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = on_socket_open


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class Waiter:
    """Receives on one topic and hands the arrival time to whoever waits for a key."""

    def __init__(self, url_host: str, port: int, topic: str, key) -> None:
        self.arrived: dict[str, float] = {}
        self.cond = threading.Condition()
        self.key = key
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"w-{uuid.uuid4().hex[:6]}"
        )
        self.client.on_message = self._on
        nodelay(self.client)
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, 1)
        self.client.connect(url_host, port, 30)
        self.client.loop_start()
        assert ready.wait(10)

    def _on(self, client, userdata, msg) -> None:
        t = time.perf_counter()
        k = self.key(msg.payload)
        if k is not None:
            with self.cond:
                self.arrived[k] = t
                self.cond.notify_all()

    def wait(self, k: str, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while k not in self.arrived:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(k)
                self.cond.wait(left)
            return self.arrived.pop(k)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CommitProbe:
    """A bare SQLite commit (WAL, synchronous=FULL) on the agent's filesystem: the floor of
    any design that puts a command on disk before it answers RECEIVED."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE t (v BLOB)")

    def once(self, blob: bytes) -> float:
        t0 = time.perf_counter()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO t VALUES (?)", (blob,))
        self.db.execute("COMMIT")
        return (time.perf_counter() - t0) * 1e3


def terminal_key(payload: bytes) -> str | None:
    try:
        e = JobEvent.decode(payload)
    except Exception:
        return None
    return e.command_id if e.state.terminal else None


def received_key(payload: bytes) -> str | None:
    try:
        e = JobEvent.decode(payload)
    except Exception:
        return None
    return e.command_id if e.state.value == "RECEIVED" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--commands", type=int, default=1000)
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument(
        "--broker-nagle",
        action="store_true",
        help="leave Mosquitto's set_tcp_nodelay at its default (false)",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="jf-bench-"))
    broker = BenchMosquitto(tmp / "broker", nodelay=not args.broker_nagle)
    broker.start()
    root, release, operator = (SigningKey.generate() for _ in range(3))
    trust = tmp / "trust.json"
    trust.write_bytes(
        build_trust_root(root=[root], release=[release], operator=[operator]).encode()
    )
    cfg = write_agent_config(
        tmp / "agent.toml",
        device_id=DEV,
        broker_url=broker.url,
        data_dir=tmp / "data",
        trust_root=trust,
        telemetry_interval_s=1.0,
    )
    topics = Topics()
    with EventCollector(broker.url, DEV) as status:
        agent = AgentProcess(cfg).start()
        status.wait_online()
    try:
        events = Waiter("127.0.0.1", broker.port, topics.events(DEV), received_key)
        echo_topic = "bench/echo"
        echo = Waiter("127.0.0.1", broker.port, echo_topic, lambda p: p[:36].decode())
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub")
        nodelay(pub)
        pub.connect("127.0.0.1", broker.port, 30)
        pub.loop_start()
        # Pre-signed: signing is the operator's cost, not the device's.
        cmds = []
        for _ in range(args.commands + 20):
            c = make_command(DEV, "ping", ttl_s=3600)
            cmds.append((c.command_id, sign_command(c, operator)))
        agent_ms: list[float] = []
        broker_ms: list[float] = []
        commit_ms: list[float] = []
        probe = CommitProbe(tmp / "commit-probe.db")
        for i, (cid, payload) in enumerate(cmds):
            # The broker's own round trip, same size, right before.
            tag = str(uuid.uuid4())
            body = tag.encode() + payload[36:]
            t0 = time.perf_counter()
            pub.publish(echo_topic, body, qos=1)
            t1 = echo.wait(tag)
            t2 = time.perf_counter()
            pub.publish(topics.device_cmd(DEV), payload, qos=1)
            t3 = events.wait(cid)
            c = probe.once(payload)
            if i >= 20:  # warm-up
                broker_ms.append((t1 - t0) * 1e3)
                agent_ms.append((t3 - t2) * 1e3)
                commit_ms.append(c)
        # Idle as in the field: a model active (LiveStats window, engine on disk), after a
        # deploy whose engine work ran in the builder child process.
        bundle = build_bundle(tmp, release, version="1.0.0")
        deploy = make_command(DEV, "deploy", deploy_body(bundle), ttl_s=3600)
        done = Waiter("127.0.0.1", broker.port, topics.events(DEV), terminal_key)
        pub.publish(topics.device_cmd(DEV), sign_command(deploy, operator), qos=1)
        final_state = done.wait(deploy.command_id, timeout=120)
        done.close()
        proc = psutil.Process(agent.pid)
        time.sleep(2.0)  # let the last events go out
        cpu0 = proc.cpu_times()
        w0 = time.monotonic()
        rss_max = 0
        rss_samples = []
        while time.monotonic() - w0 < args.idle_s:
            rss = proc.memory_info().rss
            rss_samples.append(rss)
            rss_max = max(rss_max, rss)
            time.sleep(1.0)
        cpu1 = proc.cpu_times()
        wall = time.monotonic() - w0
        cpu_pct = 100.0 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall
        pub.loop_stop()
        events.close()
        echo.close()
    finally:
        agent.stop()
        broker.stop()

    res = {
        "commands": len(agent_ms),
        "agent_p50_ms": statistics.median(agent_ms),
        "agent_p99_ms": pct(agent_ms, 99),
        "broker_p50_ms": statistics.median(broker_ms),
        "broker_p99_ms": pct(broker_ms, 99),
        "commit_p50_ms": statistics.median(commit_ms),
        "commit_p99_ms": pct(commit_ms, 99),
        "deploy_before_idle": final_state is not None,
        "idle_s": round(wall, 1),
        "idle_rss_max_mib": rss_max / 2**20,
        "idle_rss_median_mib": statistics.median(rss_samples) / 2**20,
        "idle_cpu_pct_of_core": cpu_pct,
        "load_avg_1m": psutil.getloadavg()[0],
        "broker_tcp_nodelay": not args.broker_nagle,
    }
    res["p99_ratio_agent_over_broker"] = res["agent_p99_ms"] / res["broker_p99_ms"]
    r = res
    lines = [
        f"publish -> RECEIVED, {r['commands']} signed pings, QoS 1, loopback, one at a time",
        f"  agent         p50 {r['agent_p50_ms']:6.2f} ms   p99 {r['agent_p99_ms']:6.2f} ms",
        f"  broker alone  p50 {r['broker_p50_ms']:6.2f} ms   p99 {r['broker_p99_ms']:6.2f} ms"
        "   (paho pub -> paho sub, interleaved)",
        f"  disk commit   p50 {r['commit_p50_ms']:6.2f} ms   p99 {r['commit_p99_ms']:6.2f} ms"
        "   (bare SQLite FULL commit, interleaved)",
        f"  p99 agent/broker {r['p99_ratio_agent_over_broker']:.1f}x   (goals: p99 < 20 ms, < 5x)",
        f"idle {r['idle_s']} s with a model active, telemetry 1 Hz:",
        f"  RSS max {r['idle_rss_max_mib']:.1f} MiB (median {r['idle_rss_median_mib']:.1f})"
        f"   CPU {r['idle_cpu_pct_of_core']:.2f}% of a core   (goals: < 60 MiB, < 1%)",
        f"load average (1 min) at the end: {r['load_avg_1m']:.2f}",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
