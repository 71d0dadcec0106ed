"""The generated Mosquitto config, run for real: every device stays in its own lane.

Each "cannot" test has a positive control in the same run (the legitimate receiver does
get the message), so a test cannot pass just because nothing was delivered at all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from controller.security import pki
from protocol.topics import Topics
from protocol.transport import client_tls_context
from tests.transport.brokers import FleetPki, Probe, TlsBroker

T = Topics()
QUIET = 1.0  # seconds to wait for a message that must not come

MakeProbe = Callable[..., Probe]


def test_device_cannot_receive_another_devices_commands(probe: MakeProbe) -> None:
    controller, a, b = probe("controller"), probe("robot-a"), probe("robot-b")
    b.subscribe(T.device_cmd("robot-b"))
    # Mosquitto 2.0 grants the SUBACK and then filters each message by the ACL, so what
    # counts is what is delivered.
    a.subscribe(T.device_cmd("robot-b"))
    a.subscribe(f"{T.prefix}/devices/+/cmd")  # its own cmd is in there, B's must not be
    controller.publish(T.device_cmd("robot-b"), b"for-b")

    assert [m.payload for m in b.receive(5)] == [b"for-b"]
    assert a.receive(QUIET) == []


def test_device_receives_its_own_and_its_groups_commands_only(probe: MakeProbe) -> None:
    controller, a = probe("controller"), probe("robot-a")
    for topic in (
        T.device_cmd("robot-a"),
        T.group_cmd("warehouse-a"),
        T.group_cmd("canary"),
        T.group_cmd("warehouse-b"),  # robot-b's group
    ):
        a.subscribe(topic)
    controller.publish(T.group_cmd("warehouse-b"), b"not-for-a")
    controller.publish(T.device_cmd("robot-a"), b"own")
    controller.publish(T.group_cmd("warehouse-a"), b"group")
    controller.publish(T.group_cmd("canary"), b"canary")

    got = sorted(m.payload for m in a.receive(5))
    assert got == [b"canary", b"group", b"own"]


def test_device_cannot_publish_as_another_device(probe: MakeProbe, tls_broker: TlsBroker) -> None:
    controller, a = probe("controller"), probe("robot-a")
    for channel in ("events", "status", "telemetry"):
        controller.subscribe(f"{T.prefix}/devices/+/{channel}")
    a.publish(T.events("robot-b"), b"forged-event")
    a.publish(T.status("robot-b"), b"forged-status", retain=True)
    a.publish(T.telemetry("robot-b"), b"forged-telemetry", qos=0)
    a.publish(T.device_cmd("robot-b"), b"forged-command")
    # A's own messages go through, after the forged ones: once they arrive, anything
    # the broker had let through would have arrived too.
    a.publish(T.events("robot-a"), b"own-event")
    a.publish(T.status("robot-a"), b"own-status", retain=True)

    got = {(m.topic, m.payload) for m in controller.receive(5)}
    assert got == {(T.events("robot-a"), b"own-event"), (T.status("robot-a"), b"own-status")}
    for channel in ("events", "status", "telemetry", "cmd"):
        assert "Denied PUBLISH from" in tls_broker.log
        assert f"'{T.prefix}/devices/robot-b/{channel}'" in tls_broker.log


def test_forged_retained_status_is_not_stored_for_later_subscribers(probe: MakeProbe) -> None:
    a = probe("robot-a")
    a.publish(T.status("robot-b"), b"forged", retain=True)
    a.publish(T.status("robot-a"), b"own", retain=True)
    late = probe("controller")
    late.subscribe(T.all_status())
    assert {(m.topic, m.payload) for m in late.receive(3)} == {(T.status("robot-a"), b"own")}


def test_device_reads_nothing_of_other_devices(probe: MakeProbe) -> None:
    a, b, controller = probe("robot-a"), probe("robot-b"), probe("controller")
    a.subscribe(f"{T.prefix}/#")
    b.publish(T.events("robot-b"), b"e")
    b.publish(T.status("robot-b"), b"s", retain=True)
    b.publish(T.telemetry("robot-b"), b"t", qos=0)
    controller.publish(T.device_cmd("robot-a"), b"own-cmd")  # the only thing A may read
    assert [(m.topic, m.payload) for m in a.receive(3)] == [(T.device_cmd("robot-a"), b"own-cmd")]


def test_will_on_another_devices_status_is_refused(
    tls_broker: TlsBroker, fleet_pki: FleetPki, probe: MakeProbe
) -> None:
    controller = probe("controller")
    controller.subscribe(T.all_status())
    rogue = Probe(tls_broker.host, tls_broker.port, fleet_pki.tls("robot-a"))
    rogue.client.will_set(T.status("robot-b"), b'{"online": false}', qos=1, retain=True)
    if rogue.connect():
        rogue.client.socket().close()  # die without DISCONNECT: the will would fire now
    rogue.client.loop_stop()
    assert controller.receive(1) == []


def test_controller_commands_every_device_and_group_and_reads_everything(
    probe: MakeProbe,
) -> None:
    controller = probe("controller")
    for topic in (T.all_events(), T.all_status(), T.all_telemetry()):
        assert controller.subscribe(topic) == [1]
    a, b, c = probe("robot-a"), probe("robot-b"), probe("robot-c")
    a.subscribe(T.device_cmd("robot-a"))
    b.subscribe(T.device_cmd("robot-b"))
    b.subscribe(T.group_cmd("warehouse-b"))
    c.subscribe(T.device_cmd("robot-c"))  # a device with no groups still gets its commands

    controller.publish(T.device_cmd("robot-a"), b"deploy-a")
    controller.publish(T.group_cmd("warehouse-b"), b"deploy-group-b")
    controller.publish(T.device_cmd("robot-c"), b"ping-c")
    assert [m.payload for m in a.receive(5)] == [b"deploy-a"]
    assert [m.payload for m in b.receive(5)] == [b"deploy-group-b"]
    assert [m.payload for m in c.receive(5)] == [b"ping-c"]

    a.publish(T.events("robot-a"), b"ev")
    b.publish(T.status("robot-b"), b"st", retain=True)
    c.publish(T.telemetry("robot-c"), b"tm", qos=0)
    got = {(m.topic, m.payload) for m in controller.receive(5)}
    assert got == {
        (T.events("robot-a"), b"ev"),
        (T.status("robot-b"), b"st"),
        (T.telemetry("robot-c"), b"tm"),
    }


def test_controller_can_use_a_shared_telemetry_subscription(probe: MakeProbe) -> None:
    ingest = probe("controller")
    rcs = ingest.subscribe(T.shared_telemetry("ingest"), qos=0)
    assert rcs == [0]
    a = probe("robot-a")
    a.publish(T.telemetry("robot-a"), b"sample", qos=0)
    assert [m.payload for m in ingest.receive(5)][:1] == [b"sample"]


def test_client_without_a_certificate_cannot_connect(
    tls_broker: TlsBroker, fleet_pki: FleetPki
) -> None:
    anon = Probe(tls_broker.host, tls_broker.port, client_tls_context(str(fleet_pki.ca)))
    assert not anon.connect(timeout=3)
    anon.client.loop_stop()
    assert "peer did not return a certificate" in tls_broker.log


def test_client_with_a_certificate_of_another_ca_cannot_connect(
    tls_broker: TlsBroker, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    other = tmp_path / "other-pki"
    pki.init_ca(other, name="someone else's CA")
    # Same device name as a real device: only the CA makes the difference.
    impostor = pki.issue_device(other, "robot-a")
    ctx = client_tls_context(str(fleet_pki.ca), str(impostor.cert), str(impostor.key))
    p = Probe(tls_broker.host, tls_broker.port, ctx)
    assert not p.connect(timeout=3)
    p.client.loop_stop()
    assert "certificate verify failed" in tls_broker.log


def test_broker_certificate_cannot_be_used_as_a_client_certificate(
    tls_broker: TlsBroker, fleet_pki: FleetPki
) -> None:
    # The server certificate has serverAuth only: OpenSSL refuses it for a client.
    p = Probe(tls_broker.host, tls_broker.port, fleet_pki.tls("broker"))
    assert not p.connect(timeout=3)
    p.client.loop_stop()


def test_plain_mqtt_without_tls_cannot_connect(tls_broker: TlsBroker) -> None:
    p = Probe(tls_broker.host, tls_broker.port, None)
    assert not p.connect(timeout=3)
    p.client.loop_stop()


def test_mqtt_311_device_is_confined_the_same_way(probe: MakeProbe) -> None:
    controller = probe("controller", protocol=mqtt.MQTTv311)
    controller.subscribe(T.all_events())
    a = probe("robot-a", protocol=mqtt.MQTTv311)
    a.subscribe(T.device_cmd("robot-b"))
    a.publish(T.events("robot-b"), b"forged")
    a.publish(T.events("robot-a"), b"own")
    controller.publish(T.device_cmd("robot-b"), b"for-b")
    assert [m.payload for m in controller.receive(5)] == [b"own"]
    assert a.receive(QUIET) == []
