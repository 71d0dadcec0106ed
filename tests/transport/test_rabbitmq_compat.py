"""jetfleet on a second real broker: RabbitMQ's MQTT plugin (Debian bookworm: 3.10, MQTT
3.1.1 only). The agent runs with broker.protocol = "3.1.1"."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from controller.security import pki
from protocol.topics import Topics
from protocol.transport import client_tls_context, parse_broker_url
from tests.agent.harness import (
    AgentProcess,
    build_bundle,
    deploy_body,
    make_command,
    sign_command,
    write_agent_config,
)
from tests.transport.brokers import Collector311, Probe

pytestmark = pytest.mark.rabbitmq
T = Topics()


def _device() -> str:
    return f"rmq-{uuid.uuid4().hex[:8]}"  # one node per session: fresh ids per test


def _probe(url: str, tls: Any = None, **kw: Any) -> Probe:
    a = parse_broker_url(url)
    p = Probe(a.host, a.port, tls, protocol=mqtt.MQTTv311, **kw)
    assert p.connect(), f"cannot connect to {url} with MQTT 3.1.1"
    return p


def _agent_config(tmp: Path, device: str, url: str, trust: Path, **broker: str) -> Path:
    return write_agent_config(
        tmp / f"{device}.toml",
        device_id=device,
        groups=["rmq-group"],
        broker_url=url,
        data_dir=tmp / f"data-{device}",
        trust_root=trust,
        protocol="3.1.1",
        extra={"broker": dict(broker)},
    )


def test_rabbitmq_speaks_311_and_refuses_5(rabbitmq: Any) -> None:
    a = parse_broker_url(rabbitmq.url)
    v5 = Probe(a.host, a.port, None, protocol=mqtt.MQTTv5)
    assert not v5.connect(timeout=5)
    v5.client.loop_stop()
    _probe(rabbitmq.url).close()


def test_rabbitmq_retained_status_reaches_exact_subscriptions_only(rabbitmq: Any) -> None:
    device = _device()
    pub = _probe(rabbitmq.url)
    pub.publish(T.status(device), b'{"online": true}', retain=True)
    exact, wildcard = _probe(rabbitmq.url), _probe(rabbitmq.url)
    exact.subscribe(T.status(device))
    wildcard.subscribe(T.all_status())
    assert [m.payload for m in exact.receive(5)] == [b'{"online": true}']
    # RabbitMQ 3.10 keeps retained messages per node and never matches them against
    # wildcards: a controller must read a device's status topic by name (see docs/brokers.md).
    assert wildcard.receive(1.5) == []
    for p in (pub, exact, wildcard):
        p.close()


def test_rabbitmq_grants_qos2_as_qos1_and_queues_for_offline_sessions(rabbitmq: Any) -> None:
    device = _device()
    sub = _probe(rabbitmq.url, client_id=device, clean=False)
    assert sub.subscribe(T.device_cmd(device), qos=2) == [1]
    sub.close()
    pub = _probe(rabbitmq.url)
    pub.publish(T.device_cmd(device), b"queued while offline", qos=1)
    back = _probe(rabbitmq.url, client_id=device, clean=False)
    assert [m.payload for m in back.receive(5)] == [b"queued while offline"]
    back.close()
    pub.close()


def _deploy_and_wait(
    tmp_path: Path, rabbitmq: Any, trust_material: Any, device: str, cfg: Path, url: str,
    tls: Any = None,
) -> None:  # fmt: skip
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    controller = _probe(url, tls)
    try:
        with Collector311(url, device, tls) as events, AgentProcess(cfg) as agent:
            events.wait_online(timeout=40)
            cmd = make_command(device, "deploy", deploy_body(bundle))
            controller.publish(T.device_cmd(device), sign_command(cmd, trust_material.operator))
            try:
                final = events.wait_terminal(cmd.command_id, timeout=60)
            except AssertionError as e:
                raise AssertionError(f"{e}\nagent log:\n{agent.log()[-4000:]}\nbroker log:\n"
                                     f"{rabbitmq.log()[-2000:]}") from None  # fmt: skip
            assert final.state.value == "SUCCEEDED", (final.reason, agent.log()[-3000:])
            events.wait_status(
                lambda s: "detector" in s.models and s.models["detector"].active == "1.0.0"
            )
            # A group command reaches it too (RabbitMQ maps topic levels to routing keys).
            ping = make_command("group:rmq-group", "ping")
            controller.publish(
                T.group_cmd("rmq-group"), sign_command(ping, trust_material.operator)
            )
            assert events.wait_terminal(ping.command_id, timeout=30).state.value == "SUCCEEDED"
    finally:
        controller.close()


def test_full_deploy_on_rabbitmq_mqtt_311(
    tmp_path: Path, rabbitmq: Any, trust_material: Any
) -> None:
    device = _device()
    trust = trust_material.write(tmp_path / "trust.json")
    cfg = _agent_config(tmp_path, device, rabbitmq.url, trust)
    _deploy_and_wait(tmp_path, rabbitmq, trust_material, device, cfg, rabbitmq.url)


def test_deploy_sent_while_the_agent_is_offline_runs_when_it_returns_on_rabbitmq(
    tmp_path: Path, rabbitmq: Any, trust_material: Any
) -> None:
    device = _device()
    trust = trust_material.write(tmp_path / "trust.json")
    cfg = _agent_config(tmp_path, device, rabbitmq.url, trust)
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    controller = _probe(rabbitmq.url)
    try:
        with Collector311(rabbitmq.url, device) as events:
            with AgentProcess(cfg):  # first run creates the persistent session
                events.wait_online(timeout=40)
            events.wait_status(lambda s: not s.online)
            cmd = make_command(device, "deploy", deploy_body(bundle))
            controller.publish(T.device_cmd(device), sign_command(cmd, trust_material.operator))
            with AgentProcess(cfg) as agent:
                final = events.wait_terminal(cmd.command_id, timeout=90)
                assert final.state.value == "SUCCEEDED", (final.reason, agent.log()[-3000:])
    finally:
        controller.close()


def test_full_deploy_over_mutual_tls_on_rabbitmq(
    tmp_path: Path, rabbitmq: Any, trust_material: Any
) -> None:
    device = _device()
    cert = pki.issue_device(rabbitmq.pki_dir, device, out_dir=tmp_path / "tls")
    ops = pki.issue_controller(rabbitmq.pki_dir, f"ctl-{device}", out_dir=tmp_path / "tls")
    trust = trust_material.write(tmp_path / "trust.json")
    cfg = _agent_config(
        tmp_path, device, rabbitmq.tls_url, trust,
        ca=str(cert.ca), cert=str(cert.cert), key=str(cert.key),
    )  # fmt: skip
    tls = client_tls_context(str(ops.ca), str(ops.cert), str(ops.key))
    _deploy_and_wait(tmp_path, rabbitmq, trust_material, device, cfg, rabbitmq.tls_url, tls)


def test_rabbitmq_tls_listener_refuses_a_client_without_a_certificate(rabbitmq: Any) -> None:
    a = parse_broker_url(rabbitmq.tls_url)
    anon = Probe(a.host, a.port, client_tls_context(str(rabbitmq.pki_dir / pki.CA_CERT)),
                 protocol=mqtt.MQTTv311)  # fmt: skip
    assert not anon.connect(timeout=5)
    anon.client.loop_stop()
