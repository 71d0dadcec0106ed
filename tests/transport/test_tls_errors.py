"""Certificate problems give one sentence that names the file and the reason, both when
the TLS context is built (start-up) and when the broker refuses us (diagnose_tls)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.sandbox.localbroker import LocalMosquitto
from controller.security import pki
from protocol.transport import (
    BrokerAddress,
    TransportConfigError,
    client_tls_context,
    diagnose_tls,
    paho_client,
)
from tests.transport.brokers import FleetPki, TlsBroker, start_tls_broker


def _cert_with_dates(
    fleet: FleetPki, tmp: Path, name: str, not_before: datetime, not_after: datetime
) -> tuple[Path, Path]:
    """A device certificate signed by the fleet CA with chosen dates (pki refuses to
    make expired ones, as it should)."""
    ca = pki.load_ca(fleet.root)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(ca.key, hashes.SHA256())
    )
    c, k = tmp / f"{name}.crt", tmp / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.write_private(
        k,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return c, k


def test_missing_certificate_file_is_named(fleet_pki: FleetPki, tmp_path: Path) -> None:
    missing = tmp_path / "robot-a.crt"
    with pytest.raises(TransportConfigError, match=f"client certificate file {missing} does"):
        client_tls_context(str(fleet_pki.ca), str(missing), str(fleet_pki.certs["robot-a"].key))


def test_key_that_does_not_match_the_certificate_is_named(fleet_pki: FleetPki) -> None:
    a, b = fleet_pki.certs["robot-a"], fleet_pki.certs["robot-b"]
    with pytest.raises(TransportConfigError) as e:
        client_tls_context(str(fleet_pki.ca), str(a.cert), str(b.key))
    assert str(a.cert) in str(e.value) and str(b.key) in str(e.value)
    assert "key matches the certificate" in str(e.value)


def test_expired_client_certificate_is_named_at_startup(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    now = datetime.now(timezone.utc)
    cert, key = _cert_with_dates(
        fleet_pki, tmp_path, "robot-old", now - timedelta(days=900), now - timedelta(days=75)
    )
    with pytest.raises(TransportConfigError, match=f"client certificate {cert} expired on"):
        client_tls_context(str(fleet_pki.ca), str(cert), str(key))


def test_not_yet_valid_certificate_points_at_the_clock(fleet_pki: FleetPki, tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    cert, key = _cert_with_dates(
        fleet_pki, tmp_path, "robot-future", now + timedelta(days=2), now + timedelta(days=400)
    )
    with pytest.raises(TransportConfigError, match="check the clock"):
        client_tls_context(str(fleet_pki.ca), str(cert), str(key))


def test_device_certificate_given_as_the_ca_is_explained(fleet_pki: FleetPki) -> None:
    a = fleet_pki.certs["robot-a"]
    with pytest.raises(TransportConfigError, match=f"CA certificate file {a.cert} holds no CA"):
        client_tls_context(str(a.cert), str(a.cert), str(a.key))


def test_broker_signed_by_another_ca_is_named(
    tls_broker: TlsBroker, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    a = fleet_pki.certs["robot-a"]
    addr = BrokerAddress(tls_broker.host, tls_broker.port, True)
    msg = diagnose_tls(addr, str(other / pki.CA_CERT), str(a.cert), str(a.key))
    assert msg is not None
    assert f"not signed by the CA in {other / pki.CA_CERT}" in msg


def test_client_certificate_of_another_ca_is_named_as_refused(
    tls_broker: TlsBroker, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    stranger = pki.issue_device(other, "robot-a")
    addr = BrokerAddress(tls_broker.host, tls_broker.port, True)
    msg = diagnose_tls(addr, str(fleet_pki.ca), str(stranger.cert), str(stranger.key))
    assert msg is not None
    assert f"refused client certificate {stranger.cert}" in msg
    assert "not issued by a CA the broker trusts" in msg


def test_missing_client_certificate_is_explained(
    tls_broker: TlsBroker, fleet_pki: FleetPki
) -> None:
    addr = BrokerAddress(tls_broker.host, tls_broker.port, True)
    msg = diagnose_tls(addr, str(fleet_pki.ca))
    assert msg is not None and "requires a client certificate" in msg


def test_accepted_client_gets_no_diagnosis(tls_broker: TlsBroker, fleet_pki: FleetPki) -> None:
    a = fleet_pki.certs["robot-a"]
    addr = BrokerAddress(tls_broker.host, tls_broker.port, True)
    assert diagnose_tls(addr, str(a.ca), str(a.cert), str(a.key)) is None


def test_broker_certificate_without_the_hostname_is_explained(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    # A broker whose certificate names only `localhost`, reached as 127.0.0.1.
    pki.issue_server(fleet_pki.root, ["localhost"], name="broker-localhost-only")
    broker = start_tls_broker(tmp_path / "b", fleet_pki, server_name="broker-localhost-only")
    try:
        a = fleet_pki.certs["robot-a"]
        addr = BrokerAddress("127.0.0.1", broker.port, True)
        msg = diagnose_tls(addr, str(a.ca), str(a.cert), str(a.key))
        assert msg is not None and "does not name '127.0.0.1'" in msg
        assert "issue-server --host 127.0.0.1" in msg
        assert diagnose_tls(BrokerAddress("localhost", broker.port, True), str(a.ca),
                            str(a.cert), str(a.key)) is None  # fmt: skip
    finally:
        broker.stop()


def test_tls_to_a_plain_mqtt_port_is_explained(
    mosquitto: LocalMosquitto, fleet_pki: FleetPki
) -> None:
    a = fleet_pki.certs["robot-a"]
    msg = diagnose_tls(
        BrokerAddress(mosquitto.host, mosquitto.port, True), str(a.ca), str(a.cert), str(a.key)
    )
    assert msg is not None and "plain mqtt:// port" in msg


def test_controller_connect_errors_name_the_certificate_file(
    tls_broker: TlsBroker, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    from controller.mqtt import ControllerMqtt, MqttError, MqttOptions

    other = tmp_path / "other"
    pki.init_ca(other)
    stranger = pki.issue_device(other, "robot-a")
    c = fleet_pki.certs["controller"]
    cases = [
        (MqttOptions(broker=tls_broker.url, ca=str(other / "ca.crt"), cert=str(c.cert),
                     key=str(c.key)), f"not signed by the CA in {other / 'ca.crt'}"),
        (MqttOptions(broker=tls_broker.url, ca=str(c.ca), cert=str(stranger.cert),
                     key=str(stranger.key)), f"refused client certificate {stranger.cert}"),
        (MqttOptions(broker=tls_broker.url, ca=str(c.ca)), "requires a client certificate"),
    ]  # fmt: skip
    for options, expected in cases:
        with pytest.raises(MqttError) as e:
            ControllerMqtt(options).connect(timeout=1)
        assert expected in str(e.value)
    ControllerMqtt(MqttOptions(broker=tls_broker.url, ca=str(c.ca), cert=str(c.cert),
                               key=str(c.key))).connect(timeout=5).close()  # fmt: skip


def test_agent_logs_why_the_broker_refuses_it_naming_the_file(
    tls_broker: TlsBroker, fleet_pki: FleetPki, tmp_path: Path, trust_material: Any
) -> None:
    import time

    from tests.agent.harness import AgentProcess, write_agent_config

    other = tmp_path / "other"
    pki.init_ca(other)
    stranger = pki.issue_device(other, "robot-a")
    a = fleet_pki.certs["robot-a"]
    trust = trust_material.write(tmp_path / "trust.json")
    cases = [
        ({"ca": str(other / pki.CA_CERT), "cert": str(a.cert), "key": str(a.key)},
         f"the broker's certificate is not signed by the CA in {other / pki.CA_CERT}"),
        ({"ca": str(a.ca), "cert": str(stranger.cert), "key": str(stranger.key)},
         f"the broker refused client certificate {stranger.cert}"),
    ]  # fmt: skip
    for i, (tls, expected) in enumerate(cases):
        cfg = write_agent_config(
            tmp_path / f"agent{i}.toml", device_id="robot-a", broker_url=tls_broker.url,
            data_dir=tmp_path / f"data{i}", trust_root=trust, extra={"broker": tls},
        )  # fmt: skip
        with AgentProcess(cfg) as agent:
            deadline = time.monotonic() + 20
            while "mqtt_tls_problem" not in agent.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            log = agent.log()
        assert expected in log, log[-2000:]
        assert log.count("mqtt_tls_problem") == 1  # once, not on every retry


def test_every_client_follows_one_tls_rule_the_url_scheme(
    tls_broker: TlsBroker, mosquitto: LocalMosquitto, fleet_pki: FleetPki
) -> None:
    a = fleet_pki.certs["robot-a"]
    files = {"ca": str(fleet_pki.ca), "cert": str(a.cert), "key": str(a.key)}
    # mqtts://: TLS with the fleet's files (a handshake to the TLS listener).
    client, addr = paho_client(tls_broker.url, client_id="robot-a", **files)
    assert addr.tls
    assert client.connect(addr.host, addr.port) == 0
    client.disconnect()
    # mqtt://: plain MQTT whatever files are set; a plain broker accepts the CONNECT.
    plain, addr = paho_client(mosquitto.url, client_id="robot-a", protocol="3.1.1", **files)
    assert not addr.tls
    acked = threading.Event()
    plain.on_connect = lambda _c, _u, _f, reason, _p: acked.set() if not reason.is_failure else None
    plain.connect(addr.host, addr.port)
    plain.loop_start()
    try:
        assert acked.wait(10)
    finally:
        plain.disconnect()
        plain.loop_stop()
