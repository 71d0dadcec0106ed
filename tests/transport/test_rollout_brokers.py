"""A rollout in waves by the controller's real rollout engine to real agents, over mutual
TLS on the generated Mosquitto config, and on RabbitMQ's MQTT 3.1.1."""

from __future__ import annotations

import hashlib
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from controller.mqtt import MqttOptions
from controller.rollouts.store import SUCCEEDED
from controller.security import pki
from protocol.transport import client_tls_context
from tests.agent.harness import AgentProcess, EventCollector, build_bundle, write_agent_config
from tests.controller.fleet import ControllerHarness
from tests.transport.brokers import Collector311, FleetPki, TlsBroker


def _bundle_args(bundle: Path) -> dict[str, Any]:
    data = bundle.read_bytes()
    return {
        "bundle_url": bundle.resolve().as_uri(),
        "bundle_sha256": hashlib.sha256(data).hexdigest(),
        "bundle_size": len(data),
    }


def _roll_out(
    tmp: Path,
    trust_material: Any,
    *,
    url: str,
    protocol: str,
    devices: dict[str, dict[str, str]],  # device id -> agent [broker] TLS settings
    controller_tls: dict[str, str],
    collector: Any,
) -> None:
    trust = trust_material.write(tmp / "trust.json")
    bundle = build_bundle(tmp, trust_material.release, version="1.0.0")
    h = ControllerHarness(tmp / "controller.db", url, trust_material.operator)
    h.options = MqttOptions(broker=url, protocol=protocol, **controller_tls)
    with ExitStack() as stack:
        agents = {}
        for device, tls in devices.items():
            cfg = write_agent_config(
                tmp / f"{device}.toml",
                device_id=device,
                broker_url=url,
                data_dir=tmp / f"data-{device}",
                trust_root=trust,
                protocol=protocol,
                extra={"broker": tls},
            )
            events = stack.enter_context(collector(device))
            agents[device] = stack.enter_context(AgentProcess(cfg))
            events.wait_online(timeout=40)
        rid = h.create(
            sorted(devices), model="detector", version="1.0.0", waves_spec="1,100%",
            wave_timeout=90.0, **_bundle_args(bundle),
        )  # fmt: skip
        result = h.drive(rid)
        logs = {d: a.log()[-1500:] for d, a in agents.items()}
        assert result.state == SUCCEEDED, (result.abort_reason, logs)
        summary = h.store.summary(rid)
        assert [w.state for w in summary.waves] == ["done", "done"]


def test_rollout_in_waves_over_mutual_tls(
    tmp_path: Path, tls_broker: TlsBroker, fleet_pki: FleetPki, trust_material: Any
) -> None:
    devices = {}
    for d in ("robot-a", "robot-b"):
        c = fleet_pki.certs[d]
        devices[d] = {"ca": str(c.ca), "cert": str(c.cert), "key": str(c.key)}
    ctl = fleet_pki.certs["controller"]

    def collector(device: str) -> EventCollector:
        e = EventCollector(tls_broker.url, device)
        e.client.tls_set_context(fleet_pki.tls("controller"))
        return e

    _roll_out(
        tmp_path, trust_material, url=tls_broker.url, protocol="5", devices=devices,
        controller_tls={"ca": str(ctl.ca), "cert": str(ctl.cert), "key": str(ctl.key)},
        collector=collector,
    )  # fmt: skip
    assert "Denied" not in tls_broker.log


@pytest.mark.rabbitmq
def test_rollout_in_waves_on_rabbitmq_mqtt_311(
    tmp_path: Path, rabbitmq: Any, trust_material: Any
) -> None:
    tag = uuid.uuid4().hex[:6]
    devices = {f"rmq-{tag}-a": {}, f"rmq-{tag}-b": {}}
    _roll_out(
        tmp_path, trust_material, url=rabbitmq.url, protocol="3.1.1", devices=devices,
        controller_tls={}, collector=lambda d: Collector311(rabbitmq.url, d),
    )  # fmt: skip


@pytest.mark.rabbitmq
def test_rollout_over_mutual_tls_on_rabbitmq(
    tmp_path: Path, rabbitmq: Any, trust_material: Any
) -> None:
    tag = uuid.uuid4().hex[:6]
    devices: dict[str, dict[str, str]] = {}
    for d in (f"rmq-{tag}-a", f"rmq-{tag}-b"):
        c = pki.issue_device(rabbitmq.pki_dir, d, out_dir=tmp_path / "tls")
        devices[d] = {"ca": str(c.ca), "cert": str(c.cert), "key": str(c.key)}
    ctl = pki.issue_controller(rabbitmq.pki_dir, f"ctl-{tag}", out_dir=tmp_path / "tls")
    tls = client_tls_context(str(ctl.ca), str(ctl.cert), str(ctl.key))
    _roll_out(
        tmp_path, trust_material, url=rabbitmq.tls_url, protocol="3.1.1", devices=devices,
        controller_tls={"ca": str(ctl.ca), "cert": str(ctl.cert), "key": str(ctl.key)},
        collector=lambda d: Collector311(rabbitmq.tls_url, d, tls),
    )  # fmt: skip
