"""A full deploy over mutual TLS: the real agent subprocess, confined by the generated
ACL, on a Mosquitto started with the generated config; commands signed by the operator
and sent with the controller's certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controller.security import pki
from protocol.topics import Topics
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    make_command,
    sign_command,
    write_agent_config,
)
from tests.transport.brokers import GROUPS, FleetPki, Probe, TlsBroker

T = Topics()


def _tls_agent_config(
    tmp: Path, broker: TlsBroker, cert: pki.IssuedCert, trust: Path, **kw: Any
) -> Path:
    return write_agent_config(
        tmp / f"{cert.common_name}.toml",
        device_id=cert.common_name,
        groups=GROUPS.get(cert.common_name, []),
        broker_url=broker.url,
        data_dir=tmp / f"data-{cert.common_name}",
        trust_root=trust,
        extra={"broker": {"ca": str(cert.ca), "cert": str(cert.cert), "key": str(cert.key)}},
        telemetry_interval_s=1.0,
        **kw,
    )


def _controller_collector(broker: TlsBroker, fleet: FleetPki, device_id: str) -> EventCollector:
    events = EventCollector(broker.url, device_id)
    events.client.tls_set_context(fleet.tls("controller"))
    return events


def _controller_publisher(broker: TlsBroker, fleet: FleetPki) -> Probe:
    p = Probe(broker.host, broker.port, fleet.tls("controller"))
    assert p.connect(), broker.log[-1500:]
    return p


def test_full_deploy_over_mutual_tls_succeeds(
    tmp_path: Path, tls_broker: TlsBroker, fleet_pki: FleetPki, trust_material: Any
) -> None:
    trust = trust_material.write(tmp_path / "trust.json")
    cfg = _tls_agent_config(tmp_path, tls_broker, fleet_pki.certs["robot-a"], trust)
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    controller = _controller_publisher(tls_broker, fleet_pki)
    try:
        with (
            _controller_collector(tls_broker, fleet_pki, "robot-a") as events,
            AgentProcess(cfg) as agent,
        ):
            events.wait_online(timeout=30)
            # A group command (robot-a is in warehouse-a): the ACL's per-user block.
            cmd = make_command("group:warehouse-a", "deploy", deploy_body(bundle))
            controller.publish(
                T.group_cmd("warehouse-a"), sign_command(cmd, trust_material.operator)
            )
            final = events.wait_terminal(cmd.command_id, timeout=90)
            assert final.state.value == "SUCCEEDED", (final.reason, agent.log()[-3000:])
            status = events.wait_status(
                lambda s: "detector" in s.models and s.models["detector"].active == "1.0.0"
            )
            assert status.online
            # The agent's telemetry passes the ACL too (its own telemetry topic).
            controller.subscribe(T.telemetry("robot-a"), qos=0)
            assert controller.receive(10), "no telemetry from the agent over TLS"
        assert "mqtt_connected" in agent.log()
    finally:
        controller.close()
    # The broker saw the agent as its certificate's name, and refused nothing it sent.
    assert "u'robot-a'" in tls_broker.log
    assert "Denied" not in tls_broker.log
