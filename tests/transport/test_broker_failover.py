"""A broker given as a list of nodes (a cluster without a load balancer): the order the
nodes are tried in, and paho's own reconnects following the list, on real Mosquittos.
The two Mosquittos stand in for cluster nodes only as far as connecting goes; sessions
across nodes are the cluster's job (tests/transport/test_rabbitmq_cluster.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from controller.mqtt import ControllerMqtt, MqttError, MqttOptions
from controller.sandbox.localbroker import LocalMosquitto, free_port
from protocol.transport import BrokerAddress, BrokerList, TransportConfigError, parse_broker_urls


def _a(port: int) -> BrokerAddress:
    return BrokerAddress("127.0.0.1", port, False)


def test_nodes_are_tried_in_order_and_the_first_again_after_a_lost_connection() -> None:
    brokers = BrokerList([_a(1), _a(2), _a(3)])
    assert brokers.current.port == 1
    assert [brokers.failed().port for _ in range(4)] == [2, 3, 1, 2]  # each attempt failed
    brokers.established()  # connected to node 2, then lost: node 1 may be back
    assert [brokers.failed().port for _ in range(2)] == [1, 2]


def test_a_list_is_comma_separated_and_of_one_tls_kind() -> None:
    assert [a.port for a in parse_broker_urls("mqtt://h:1, mqtt://h:2")] == [1, 2]
    with pytest.raises(TransportConfigError, match="mix mqtt:// and mqtts://"):
        parse_broker_urls("mqtt://h:1,mqtts://h:2")
    with pytest.raises(TransportConfigError, match="empty"):
        parse_broker_urls(" , ")


def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_the_controller_skips_a_dead_node_and_follows_the_list_when_its_node_stops(
    tmp_path: Path,
) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    with LocalMosquitto(tmp_path / "one") as one, LocalMosquitto(tmp_path / "two") as two:
        m = ControllerMqtt(MqttOptions(broker=f"{dead},{one.url},{two.url}", protocol="3.1.1"))
        with m.connect(timeout=5):
            assert m.connected and m.address.port == one.port
            one.stop()
            # paho's own reconnect: node one refuses, the list moves on to node two.
            assert _wait(lambda: m.connected, 20), "did not reconnect to the next node"
            assert m.address.port == two.port
            m.publish("jetfleet/v1/failover-probe", b"x", timeout=5)
    with pytest.raises(MqttError, match="cannot connect"):
        ControllerMqtt(MqttOptions(broker=f"{dead},{dead}")).connect(timeout=2)
