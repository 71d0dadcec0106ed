"""Per-device lanes on RabbitMQ: the permissions `rabbitmq_permission_commands` generates,
applied with `rabbitmqctl` to a real node, keep a device to its own commands (and its
groups'), and its own events, as the Mosquitto ACL does (test_broker_acl.py)."""

from __future__ import annotations

import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from controller.security.brokerconfig import rabbitmq_permission_commands
from protocol.topics import Topics
from tests.transport.brokers import Probe

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]  # ~17 s: each rabbitmqctl is ~1.5 s
T = Topics()


def _login(rabbitmq: Any, user: str, client_id: str | None = None) -> Probe:
    p = Probe(rabbitmq.host, rabbitmq.port, None, client_id=client_id or user,
              protocol=mqtt.MQTTv311)  # fmt: skip
    p.client.username_pw_set(user, "pw-" + user)
    assert p.connect(), f"{user} could not log in"
    return p


def test_generated_rabbitmq_permissions_keep_each_device_in_its_lane(rabbitmq: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    a, b, ctl, group = f"rmqp-{tag}-a", f"rmqp-{tag}-b", f"ctl-{tag}", f"g-{tag}"
    for user in (a, b, ctl):
        rabbitmq.ctl("add_user", user, "pw-" + user)
    for cmd in rabbitmq_permission_commands(controllers=[ctl], device_groups={a: [group], b: []}):
        rabbitmq.ctl(*cmd)

    robot = _login(rabbitmq, a)
    assert robot.subscribe(T.device_cmd(a)) == [1]
    assert robot.subscribe(T.group_cmd(group)) == [1]
    controller = _login(rabbitmq, ctl, f"{ctl}-1")
    assert controller.subscribe(T.all_events()) == [1]
    controller.publish(T.device_cmd(a), b"for a")
    controller.publish(T.group_cmd(group), b"for the group")
    controller.publish(T.device_cmd(b), b"for b")
    assert sorted(m.payload for m in robot.receive(3)) == [b"for a", b"for the group"]
    robot.publish(T.events(a), b"a's event")
    assert [m.topic for m in controller.receive(3)] == [T.events(a)]

    # Another device's commands: the subscription is refused (0x80) or the connection is.
    spy = _login(rabbitmq, a, f"{a}-spy")
    try:
        suback = spy.subscribe(T.device_cmd(b), timeout=5)
    except Exception:  # no SUBACK: RabbitMQ closed the connection
        suback = []
    assert suback != [1] or spy.disconnected.is_set(), suback
    controller.publish(T.device_cmd(b), b"for b again")
    assert spy.receive(2) == []
    # Speaking for another device: RabbitMQ closes the connection; nothing arrives.
    forger = _login(rabbitmq, a)
    forger.client.publish(T.events(b), b"forged", qos=1)
    assert forger.disconnected.wait(5)
    assert controller.receive(2) == []
    for p in (robot, controller, spy, forger):
        p.close()
