"""The MQTT side: protocol versions, persistent session, will, telemetry, clean stop."""

from __future__ import annotations

import getpass
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from protocol.telemetry import TelemetrySample
from protocol.topics import Topics
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)

DEV = "robot-4"


def _cfg(tmp_path: Path, mosquitto, trust_material, protocol: str = "5") -> Path:
    return write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
        protocol=protocol,
        telemetry_interval_s=0.3,
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_commands_sent_while_agent_is_offline_arrive_when_it_returns(
    protocol: str, tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _cfg(tmp_path, mosquitto, trust_material, protocol)
    with EventCollector(mosquitto.url, DEV) as events:
        agent = AgentProcess(cfg).start()
        events.wait_online()
        assert agent.stop() == 0
        offline = events.wait_status(lambda s: not s.online)
        assert offline.device_id == DEV
        cmd = make_command(DEV, "ping")
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        agent = AgentProcess(cfg).start()
        try:
            events.wait_state(cmd.command_id, "SUCCEEDED", timeout=30)
        finally:
            agent.stop()


def test_kill9_leaves_retained_will_saying_offline(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _cfg(tmp_path, mosquitto, trust_material)
    with EventCollector(mosquitto.url, DEV) as events:
        agent = AgentProcess(cfg).start()
        events.wait_online()
        agent.kill9()
        events.wait_status(lambda s: not s.online)
    # Retained: a controller that starts later sees it too.
    with EventCollector(mosquitto.url, DEV) as late:
        assert late.wait_status(lambda s: True).online is False


def test_agent_publishes_telemetry_samples(tmp_path: Path, mosquitto, trust_material) -> None:
    cfg = _cfg(tmp_path, mosquitto, trust_material)
    got: list[TelemetrySample] = []
    done = threading.Event()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(TelemetrySample.decode(msg.payload))
        if len(got) >= 2:
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="telemetry-watcher")
    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe(Topics().telemetry(DEV), 0)
    c.connect("127.0.0.1", mosquitto.port)
    c.loop_start()
    try:
        with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg):
            events.wait_online()
            assert done.wait(20), "no telemetry"
    finally:
        c.disconnect()
        c.loop_stop()
    assert got[0].device_id == DEV


def _tls_material(d: Path) -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1 and a client certificate (real X.509)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("jetfleet-test-ca")).issuer_name(name("jetfleet-test-ca"))
        .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    write("ca", ca, ca_key)
    for stem, san in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        )  # fmt: skip
        if san:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        write(stem, b.sign(ca_key, hashes.SHA256()), key)
    return {k: d / f"{k}.pem" for k in ("ca", "server", "client")}


def test_agent_connects_over_mutual_tls(tmp_path: Path, trust_material) -> None:
    from controller.sandbox.localbroker import LocalMosquitto
    from protocol.transport import client_tls_context
    from tests.agent.harness import Publisher

    certs = tmp_path / "certs"
    certs.mkdir()
    _tls_material(certs)
    broker = LocalMosquitto(
        tmp_path / "tls-broker",
        extra_config="\n".join(
            [
                f"user {getpass.getuser()}",  # as root, mosquitto would drop to `mosquitto`
                f"cafile {certs / 'ca.pem'}",
                f"certfile {certs / 'server.pem'}",
                f"keyfile {certs / 'server.key'}",
                "require_certificate true",
                "allow_anonymous true",
            ]
        ),
    )
    broker.start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
        extra={
            "broker": {
                "ca": str(certs / "ca.pem"),
                "cert": str(certs / "client.pem"),
                "key": str(certs / "client.key"),
            }
        },
    )
    tls = client_tls_context(
        str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client.key")
    )
    try:
        with EventCollector(url, DEV, tls=tls) as events, AgentProcess(cfg) as agent:
            events.wait_online()
            cmd = make_command(DEV, "ping")
            with Publisher(url, tls=tls) as pub:
                pub.publish(Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
            events.wait_state(cmd.command_id, "SUCCEEDED")
            assert agent.alive()
    finally:
        broker.stop()


def test_missing_client_key_is_a_config_error_naming_the_file(
    tmp_path: Path, trust_material
) -> None:
    import subprocess
    import sys

    from tests.agent.harness import REPO

    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url="mqtts://127.0.0.1:8883",
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
        extra={"broker": {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "nope.key")}},
    )
    (tmp_path / "c.pem").write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "nope.key" in r.stderr


def test_an_unreachable_broker_is_logged_at_once_with_its_cause(
    tmp_path: Path, trust_material
) -> None:
    from controller.sandbox.localbroker import free_port

    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=f"mqtt://127.0.0.1:{free_port()}",  # nothing listens there
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )
    with AgentProcess(cfg) as agent:
        deadline = time.monotonic() + 15
        while "mqtt_unreachable" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = agent.log()
    assert "mqtt_unreachable" in log, log[-2000:]
    line = next(x for x in log.splitlines() if "mqtt_unreachable" in x)
    assert "Connection refused" in line
    assert log.count("mqtt_unreachable") == 1  # once per cause, not once per retry


@pytest.mark.slow
def test_two_agents_with_one_device_id_name_the_session_takeover(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    agents = []
    trust = trust_material.write(tmp_path / "trust.json")
    for name in ("a", "b"):
        cfg = write_agent_config(
            tmp_path / name / "agent.toml",
            device_id=DEV,
            broker_url=mosquitto.url,
            data_dir=tmp_path / name / "data",
            trust_root=trust,
        )
        agents.append(AgentProcess(cfg).start())
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if any("mqtt_session_taken_over" in a.log() for a in agents):
                break
            time.sleep(0.2)
        logs = "".join(a.log() for a in agents)
    finally:
        for a in agents:
            a.stop()
    line = next((x for x in logs.splitlines() if "mqtt_session_taken_over" in x), "")
    assert line, logs[-3000:]
    assert "same device_id" in line and DEV in line
