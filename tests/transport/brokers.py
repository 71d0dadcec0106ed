"""Test helpers for transport security: a fleet PKI made by controller.security.pki, a real
Mosquitto started with the configuration `jetfleet broker config` generates (on a free
loopback port), and a paho probe client that records real deliveries."""

from __future__ import annotations

import getpass
import queue
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from controller.sandbox.localbroker import find_mosquitto, free_port, wait_for_port
from controller.security import brokerconfig, pki
from protocol.transport import client_tls_context, parse_broker_url
from tests.agent.harness import EventCollector

DEVICES = ("robot-a", "robot-b", "robot-c")
GROUPS = {"robot-a": ["warehouse-a", "canary"], "robot-b": ["warehouse-b"]}


@dataclass
class FleetPki:
    root: Path
    certs: dict[str, pki.IssuedCert] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.root / pki.CA_CERT

    def tls(self, name: str) -> ssl.SSLContext:
        c = self.certs[name]
        return client_tls_context(str(c.ca), str(c.cert), str(c.key))


def make_fleet_pki(root: Path) -> FleetPki:
    pki.init_ca(root)
    fp = FleetPki(root)
    for d in DEVICES:
        fp.certs[d] = pki.issue_device(root, d)
    fp.certs["controller"] = pki.issue_controller(root)
    fp.certs["broker"] = pki.issue_server(root, ["127.0.0.1", "localhost"])
    return fp


@dataclass
class TlsBroker:
    host: str
    port: int
    workdir: Path
    files: brokerconfig.BrokerConfigFiles
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    @property
    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    def start(self) -> None:
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.files.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        try:
            wait_for_port(self.host, self.port, 10)
        except Exception:
            self.stop()
            raise RuntimeError(f"mosquitto did not start:\n{self.log[-2000:]}") from None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def start_tls_broker(
    workdir: Path, fleet: FleetPki, **options: object
) -> TlsBroker:  # options: write_broker_config's keywords
    workdir.mkdir(parents=True, exist_ok=True)
    groups = workdir / "devices.toml"
    groups.write_text(
        "[devices]\n" + "".join(f"{d} = {g!r}\n".replace("'", '"') for d, g in GROUPS.items())
    )
    port = free_port()
    (workdir / "persist").mkdir(exist_ok=True)
    kwargs: dict[str, object] = {
        "port": port,
        "bind": "127.0.0.1",
        "groups_file": groups,
        "data_dir": workdir / "persist",
        # Tests run as root in CI: keep Mosquitto as this user so it can read 0600 keys.
        "run_as": getpass.getuser(),
        # Denials in the log: the ACL tests see them, the deploy tests assert there are none.
        "log_denials": True,
        **options,
    }
    files = brokerconfig.write_broker_config(workdir / "etc", fleet.root, **kwargs)  # type: ignore[arg-type]
    broker = TlsBroker("127.0.0.1", port, workdir, files)
    broker.start()
    return broker


class Probe:
    """A paho client that records what it receives, for asserting on real delivery."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        *,
        client_id: str = "",
        protocol: int = mqtt.MQTTv5,
        clean: bool = True,
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack = threading.Event()
        self.disconnected = threading.Event()
        self.connect_rc: object = None
        self.suback: queue.Queue[list[int]] = queue.Queue()
        self.host, self.port = host, port
        self.protocol = protocol
        self.clean = clean
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else clean,
        )
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = lambda *a: self.disconnected.set()

    def _on_connect(self, client: object, userdata: object, flags: object, rc: object,
                    props: object) -> None:  # fmt: skip
        self.connect_rc = rc
        self.connack.set()

    def _on_subscribe(self, client: object, userdata: object, mid: int, rcs: list[object],
                      props: object) -> None:  # fmt: skip
        self.suback.put([int(getattr(r, "value", r)) for r in rcs])  # type: ignore[call-overload]

    def connect(self, timeout: float = 5.0) -> bool:
        """True when the broker accepted us (CONNACK success) within `timeout`."""
        try:
            if self.protocol == mqtt.MQTTv5:
                self.client.connect(self.host, self.port, keepalive=10, clean_start=self.clean)
            else:
                self.client.connect(self.host, self.port, keepalive=10)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        # A refused client is usually hung up on (TLS alert, closed socket) rather than
        # sent a CONNACK: stop waiting as soon as either happens.
        deadline = time.monotonic() + timeout
        while not self.connack.wait(0.02):
            if self.disconnected.is_set() or time.monotonic() > deadline:
                return False
        rc = self.connect_rc
        return not getattr(rc, "is_failure", bool(rc))

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.suback.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)

    def receive(self, timeout: float) -> list[mqtt.MQTTMessage]:
        """Everything delivered within `timeout` seconds."""
        got: list[mqtt.MQTTMessage] = []
        try:
            got.append(self.messages.get(timeout=timeout))
            while True:
                got.append(self.messages.get(timeout=0.2))
        except queue.Empty:
            pass
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Collector311(EventCollector):
    """The agent harness's EventCollector, speaking MQTT 3.1.1 (RabbitMQ 3.10 refuses 5)."""

    def __init__(self, url: str, device_id: str, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(url, device_id)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda *a: self._subscribe()

    def start(self) -> Collector311:
        a = parse_broker_url(self.broker_url)
        self.client.connect(a.host, a.port, 30)
        self.client.loop_start()
        assert self._connected.wait(10), "event collector could not connect"
        time.sleep(0.1)  # SUBACK
        return self
