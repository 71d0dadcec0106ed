"""The doctor's broker check against a real Mosquitto that requires mutual TLS."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import doctor
from agent.doctor import FAIL, PASS
from controller.sandbox.localbroker import LocalMosquitto
from controller.security import pki


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[LocalMosquitto, Path]]:
    ca_dir = tmp_path / "pki"
    pki.init_ca(ca_dir)
    server = pki.issue_server(ca_dir, ["127.0.0.1"])
    config = "\n".join(
        [
            f"user {getpass.getuser()}",
            f"cafile {server.ca}",
            f"certfile {server.cert}",
            f"keyfile {server.key}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
        ]
    )
    with LocalMosquitto(tmp_path / "broker", extra_config=config) as broker:
        yield broker, ca_dir


def config_for(tmp_path: Path, trust: Path, url: str, **tls: Path) -> Any:
    lines = [
        'device_id = "robot-0042"',
        f'data_dir = "{tmp_path}"',
        f'trust_root = "{trust}"',
        "[broker]",
        f'url = "{url}"',
        *[f'{k} = "{v}"' for k, v in tls.items()],
    ]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return doctor.load_config(path)


def test_a_device_certificate_from_the_fleet_ca_connects(
    tmp_path: Path, tls_broker: tuple[LocalMosquitto, Path], trust_material: Any
) -> None:
    broker, ca_dir = tls_broker
    device = pki.issue_device(ca_dir, "robot-0042")
    config = config_for(
        tmp_path,
        trust_material.write(tmp_path / "trust.json"),
        f"mqtts://127.0.0.1:{broker.port}",
        ca=device.ca,
        cert=device.cert,
        key=device.key,
    )
    result = doctor.check_broker(config, timeout=5)
    assert result.status == PASS, result.detail
    assert "(MQTT 5, TLS with client certificate)" in result.detail


def test_a_broker_certificate_from_another_ca_fails_the_handshake(
    tmp_path: Path, tls_broker: tuple[LocalMosquitto, Path], trust_material: Any
) -> None:
    broker, ca_dir = tls_broker
    device = pki.issue_device(ca_dir, "robot-0042")
    other = tmp_path / "other-pki"
    pki.init_ca(other)
    config = config_for(
        tmp_path,
        trust_material.write(tmp_path / "trust.json"),
        f"mqtts://127.0.0.1:{broker.port}",
        ca=other / "ca.crt",
        cert=device.cert,
        key=device.key,
    )
    result = doctor.check_broker(config, timeout=5)
    assert result.status == FAIL
    assert f"TLS handshake with 127.0.0.1:{broker.port} failed" in result.detail
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail


def test_no_client_certificate_where_the_broker_requires_one_fails(
    tmp_path: Path, tls_broker: tuple[LocalMosquitto, Path], trust_material: Any
) -> None:
    broker, ca_dir = tls_broker
    config = config_for(
        tmp_path,
        trust_material.write(tmp_path / "trust.json"),
        f"mqtts://127.0.0.1:{broker.port}",
        ca=ca_dir / "ca.crt",
    )
    result = doctor.check_broker(config, timeout=5)
    assert result.status == FAIL
    assert "closed the TLS connection before CONNACK" in result.detail
    assert "client, which sent no certificate" in result.detail
    assert "[broker] cert" in result.fix
