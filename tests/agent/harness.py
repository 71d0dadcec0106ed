"""Helpers to drive a real `jetfleet-agent` subprocess against a real Mosquitto.

    cfg = write_agent_config(tmp / "agent.toml", device_id="robot-1", broker_url=broker.url,
                             data_dir=tmp / "data", trust_root=trust_material.write(tmp / "t.json"))
    with EventCollector(broker.url, "robot-1") as events, AgentProcess(cfg) as agent:
        agent.wait_online(events)
        env = sign_command(trust_material.operator, "robot-1", "ping")
        publish(broker.url, Topics().device_cmd("robot-1"), env)
        events.wait_state(cid, "SUCCEEDED")

`AgentProcess` runs `python -m agent.cli run --config FILE` (stderr to a log file next to
the config); `.kill9()` is a real SIGKILL. Test-only env hook: JETFLEET_AGENT_TEST_PAUSE_AT
=STATE makes the agent's worker hold right after persisting STATE (see agent/journal.py).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol.dsse import Envelope
from protocol.keys import SigningKey
from protocol.messages import Command, DeviceStatus, JobEvent
from protocol.telemetry import TelemetrySample
from protocol.topics import Topics
from protocol.transport import parse_broker_url
from protocol.trust import sign_command as _sign

REPO = Path(__file__).resolve().parents[2]


def write_agent_config(
    path: Path,
    *,
    device_id: str,
    broker_url: str,
    data_dir: Path,
    trust_root: Path,
    groups: list[str] | tuple[str, ...] = (),
    backend: str = "onnxruntime",
    protocol: str = "5",
    hook: str = "",
    health: str = "",
    telemetry_interval_s: float = 5.0,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """An agent.toml in the format of docs/agent.md. `extra` adds sections, e.g.
    {"limits": {"max_bundle_mb": 10}, "broker": {"reconnect_max_s": 1}}."""
    sections: dict[str, dict[str, Any]] = {
        "broker": {"url": broker_url, "protocol": protocol, "reconnect_max_s": 1.0},
        "activation": {"hook": hook, "health": health, "health_interval_s": 0.2},
        "telemetry": {"interval_s": telemetry_interval_s},
    }
    for name, values in (extra or {}).items():
        sections.setdefault(name, {}).update(values)
    lines = [
        f"device_id = {json.dumps(device_id)}",
        f"groups = {json.dumps(list(groups))}",
        f"data_dir = {json.dumps(str(data_dir))}",
        f"trust_root = {json.dumps(str(trust_root))}",
        f"backend = {json.dumps(backend)}",
    ]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """The agent as a real subprocess (what systemd runs)."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = Path(config)
        self.env = env or {}
        self.log_path = self.config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env = {**base, "PYTHONPATH": str(REPO), **self.env}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
            cwd=str(REPO),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: the agent's clean shutdown."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._dump_stuck()
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def _dump_stuck(self) -> None:
        """A shutdown that hangs is a bug: SIGUSR1 makes the agent write every thread's stack
        to its log (faulthandler), and the log's tail goes to the test's captured output."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        print(f"agent did not stop on SIGTERM; its log ends:\n{self.log()[-20000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _client(client_id: str | None = None) -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )


def _host_port(url: str) -> tuple[str, int]:
    from protocol.transport import parse_broker_url

    a = parse_broker_url(url)
    return a.host, a.port


class EventCollector:
    """Subscribes to a device's events and status topics; keeps everything in order."""

    def __init__(
        self,
        broker_url: str,
        device_id: str,
        topics: Topics | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.device_id = device_id
        self.topics = topics or Topics()
        self.events: list[JobEvent] = []
        self.raw_events: list[bytes] = []
        self.statuses: list[DeviceStatus] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self.client = _client()
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self.client.on_connect = lambda *a: self._subscribe()

    def _subscribe(self) -> None:
        self.client.subscribe(
            [(self.topics.events(self.device_id), 1), (self.topics.status(self.device_id), 1)]
        )
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            try:
                if msg.topic.endswith("/events"):
                    self.raw_events.append(bytes(msg.payload))
                    self.events.append(JobEvent.decode(msg.payload))
                elif msg.payload:
                    self.statuses.append(DeviceStatus.decode(msg.payload))
            except Exception as e:  # recorded, and the test's assertions will see it
                self.errors.append(f"{msg.topic}: {e}")
            self._cond.notify_all()

    def start(self) -> EventCollector:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        host, port = _host_port(self.broker_url)
        # A persistent session: events sent while the collector reconnects (the broker
        # restarted) are queued for it, as for a real controller.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.reconnect_delay_set(0.1, 1)  # type: ignore[arg-type]
        # clean_start=False from the first connect (the client id is fresh anyway):
        # Mosquitto persists across its own restart only sessions that never asked to
        # start clean.
        self.client.connect(host, port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        assert self._connected.wait(10), "event collector could not connect"
        time.sleep(0.1)  # SUBACK
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> EventCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, pred: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    states = [(e.command_id[:8], e.state.value, e.seq) for e in self.events]
                    raise AssertionError(
                        f"timed out waiting for {what}; events: {states}; "
                        f"collector connected: {self.client.is_connected()}; "
                        f"decode errors: {self.errors[-3:]}"
                    )
                self._cond.wait(min(left, 0.2))

    def for_command(self, command_id: str) -> list[JobEvent]:
        with self._cond:
            return [e for e in self.events if e.command_id == command_id]

    def states(self, command_id: str) -> list[str]:
        """States in arrival order, progress-only repeats collapsed."""
        out: list[str] = []
        for e in self.for_command(command_id):
            if not out or out[-1] != e.state.value:
                out.append(e.state.value)
        return out

    def wait_state(self, command_id: str, state: str, timeout: float = 60.0) -> JobEvent:
        self.wait(
            lambda: any(e.state.value == state for e in self.for_command(command_id)),
            timeout,
            f"{command_id[:8]} {state}",
        )
        return next(e for e in self.for_command(command_id) if e.state.value == state)

    def wait_terminal(self, command_id: str, timeout: float = 120.0) -> JobEvent:
        self.wait(
            lambda: any(e.state.terminal for e in self.for_command(command_id)),
            timeout,
            f"{command_id[:8]} terminal",
        )
        return next(e for e in self.for_command(command_id) if e.state.terminal)

    def last_status(self) -> DeviceStatus | None:
        with self._cond:
            return self.statuses[-1] if self.statuses else None

    def wait_status(
        self, pred: Callable[[DeviceStatus], bool], timeout: float = 30.0
    ) -> DeviceStatus:
        self.wait(lambda: bool(self.statuses) and pred(self.statuses[-1]), timeout, "status")
        s = self.last_status()
        assert s is not None
        return s

    def wait_online(self, timeout: float = 30.0) -> DeviceStatus:
        return self.wait_status(lambda s: s.online, timeout)


class TelemetryTap:
    """Collects the telemetry samples one device publishes."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        addr = parse_broker_url(broker_url)
        self.samples: list[TelemetrySample] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(Topics().telemetry(device_id), 0)
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.samples.append(TelemetrySample.decode(msg.payload))
            self._cond.notify_all()

    def wait(self, pred, timeout: float = 30) -> TelemetrySample:  # type: ignore[no-untyped-def]
        with self._cond:
            assert self._cond.wait_for(lambda: any(pred(s) for s in self.samples), timeout), (
                self.samples[-1:]
            )
            return next(s for s in self.samples if pred(s))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_command(
    target: str,
    kind: str,
    body: dict[str, Any] | None = None,
    *,
    command_id: str | None = None,
    issued_at: datetime | None = None,
    ttl_s: float = 600.0,
) -> Command:
    now = issued_at or datetime.now(timezone.utc)
    return Command.new(
        command_id=command_id or str(uuid.uuid4()),
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
        target=target,
        kind=kind,
        body=body or {},
    )


def sign_command(command: Command, keys: list[SigningKey] | SigningKey) -> bytes:
    keys = keys if isinstance(keys, list) else [keys]
    return _sign(command, keys).encode()


class Publisher:
    """A paho publisher (QoS 1, waits for PUBACK)."""

    def __init__(self, broker_url: str, tls: ssl.SSLContext | None = None) -> None:
        self.client = _client()
        if tls is not None:
            self.client.tls_set_context(tls)
        host, port = _host_port(broker_url)
        self.client.connect(host, port, 30)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish(broker_url: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
    with Publisher(broker_url) as p:
        p.publish(topic, payload, retain=retain)


def build_bundle(
    out_dir: Path,
    release: SigningKey | list[SigningKey],
    *,
    name: str = "detector",
    version: str = "1.0.0",
    seed: int = 0,
    extra_work: float = 0.0,
    gate: dict[str, Any] | None = None,
    targets: dict[str, Any] | None = None,
    golden_override: dict[str, Any] | None = None,
    golden_zeros: dict[str, tuple[tuple[int, ...], str]] | None = None,
    build: dict[str, Any] | None = None,
    external_weights: bool = False,
) -> Path:
    """A real signed bundle: an ONNX MLP (tests/models.py) and ORT golden outputs.
    `external_weights` keeps the weights in a weights-<sha256>.bin member, as bundle build does.
    `golden_override` replaces golden arrays (to make a bundle that fails the gate);
    `golden_zeros` replaces or adds arrays of zeros by (shape, dtype) that are never in
    memory here (see tests.models.write_golden)."""
    from protocol.bundle import bundle_filename, make_manifest, write_bundle
    from tests.models import make_golden, make_mlp, mlp_inputs, write_golden

    work = Path(out_dir) / f"src-{name}-{version}-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True, exist_ok=True)
    model = make_mlp(work / "model.onnx", seed=seed, extra_work=extra_work)
    golden = make_golden(model, mlp_inputs(4, seed=1))
    golden.update(golden_override or {})
    for key in golden_zeros or {}:
        golden.pop(key, None)
    golden_path = write_golden(work / "golden.npz", golden, golden_zeros)
    files = {"model.onnx": model, "golden.npz": golden_path}
    if external_weights:
        files |= _externalize_weights(model)
    manifest = make_manifest(
        name=name,
        version=version,
        files=files,
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": ["batch", 16]}],
        gate={"probation_s": 0, "max_regression_pct": 1000, **(gate or {})},
        targets=targets,
        build=build,
    )
    keys = release if isinstance(release, list) else [release]
    return write_bundle(Path(out_dir) / bundle_filename(name, version), manifest, files, keys)


def _externalize_weights(model_path: Path) -> dict[str, Path]:
    """Move the model's weights into one data file named by its SHA-256
    (controller.bundles.bundler)."""
    import hashlib

    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(model_path))
    convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save(model, str(model_path))  # writes weights.bin beside it
    data = model_path.parent / "weights.bin"
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    named = data.rename(data.with_name(f"weights-{sha}.bin"))
    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = named.name
    onnx.save(model, str(model_path))
    return {named.name: named}


def deploy_body(bundle: Path, url: str | None = None, **extra: Any) -> dict[str, Any]:
    import hashlib

    data = Path(bundle).read_bytes()
    return {
        "url": url or Path(bundle).resolve().as_uri(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        **extra,
    }


def tmp_leftovers(data_dir: Path) -> list[Path]:
    """Temporary files an interrupted job may leave: must be none after recovery."""
    data_dir = Path(data_dir)
    found: list[Path] = []
    for pattern in (
        "downloads/*.part",
        "bundles/.*",
        "models/*/.tmp-*",
        "models/*/versions/.tmp-*",
        "trust/.*.tmp",
    ):
        found += list(data_dir.glob(pattern))
    return found


def engine_link_state(data_dir: Path, model: str) -> tuple[str | None, str | None]:
    """(active, previous) read from the symlinks, as the runtime sees them."""
    out: list[str | None] = []
    for link in ("current", "previous"):
        p = Path(data_dir) / "models" / model / link
        out.append(Path(os.readlink(p)).name if p.is_symlink() and p.resolve().is_dir() else None)
    return out[0], out[1]


@contextmanager
def running_agent(config: Path, collector: EventCollector, **kw: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(config, **kw).start()
    try:
        collector.wait_online(timeout=30)
        yield agent
    finally:
        agent.stop()


__all__ = [
    "AgentProcess",
    "Envelope",
    "EventCollector",
    "Publisher",
    "build_bundle",
    "deploy_body",
    "engine_link_state",
    "make_command",
    "publish",
    "running_agent",
    "sign_command",
    "tmp_leftovers",
    "write_agent_config",
]
