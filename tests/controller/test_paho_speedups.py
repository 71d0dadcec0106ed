"""The ingestion's paho speed-up decodes every PUBLISH exactly as paho itself does.

Real packets: a real Mosquitto delivers MQTT 5 PUBLISHes (with and without properties)
to a raw socket subscriber; each captured packet is then decoded by paho's own decoder
twice, as shipped and with the speed-up installed, and the results must be equal.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import paho.mqtt._packet as paho_packet
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.sandbox.localbroker import LocalMosquitto
from controller.telemetry import paho_speedups

TOPIC = "jetfleet/v1/devices/robot-1/telemetry"


def _utf8(s: str) -> bytes:
    return struct.pack("!H", len(s)) + s.encode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + _varint(len(body)) + body


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = _recv(sock, 1)[0]
    length, shift = 0, 0
    while True:
        b = _recv(sock, 1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return header, _recv(sock, length)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the broker closed the connection"
        data += chunk
    return data


def _raw_subscriber(broker: LocalMosquitto) -> socket.socket:
    """An MQTT 5 session on a bare socket, subscribed to TOPIC at QoS 1."""
    sock = socket.create_connection((broker.host, broker.port), timeout=10)
    connect = _utf8("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + b"\x00"
    sock.sendall(_packet(0x10, connect + _utf8("raw-capture")))
    assert _read_packet(sock)[0] >> 4 == 2  # CONNACK
    sock.sendall(_packet(0x82, struct.pack("!H", 1) + b"\x00" + _utf8(TOPIC) + b"\x01"))
    assert _read_packet(sock)[0] >> 4 == 9  # SUBACK
    return sock


def _publish_properties() -> list[Properties | None]:
    def props(**values: Any) -> Properties:
        p = Properties(PacketTypes.PUBLISH)
        for k, v in values.items():
            setattr(p, k, v)
        return p

    return [
        None,
        props(UserProperty=[("schema", "telemetry/1"), ("schema", "again")]),
        props(ContentType="application/json", PayloadFormatIndicator=1),
        props(ResponseTopic="jetfleet/v1/reply", CorrelationData=b"\x00\x01corr"),
        props(MessageExpiryInterval=3600, UserProperty=[("k", "v")]),
    ]


@pytest.fixture
def captured(mosquitto: LocalMosquitto) -> Iterator[list[tuple[int, bytes]]]:
    """PUBLISH packets exactly as Mosquitto sent them, one per property set."""
    sock = _raw_subscriber(mosquitto)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    try:
        packets = []
        for i, props in enumerate(_publish_properties()):
            pub.publish(TOPIC, f'{{"n": {i}}}'.encode(), qos=i % 2, properties=props)
            header, body = _read_packet(sock)
            assert header >> 4 == 3  # PUBLISH
            packets.append((header, body))
        yield packets
    finally:
        pub.disconnect()
        pub.loop_stop()
        sock.close()


def _decoded(header: int, body: bytes) -> dict[str, Any]:
    p = paho_packet.decode_publish(header, body, MQTTProtocolVersion.MQTTv5)
    props = p.properties
    assert props is not None
    present = {n.replace(" ", ""): getattr(props, n.replace(" ", ""), None) for n in props.names}
    return {
        "fields": (p.dup, p.qos, p.retain, p.topic, p.mid, bytes(p.payload)),
        "json": props.json(),
        "str": str(props),
        "attributes": present,
        "packet_type": props.packetType,
    }


def test_publish_packets_decode_the_same_with_the_speed_up(
    captured: list[tuple[int, bytes]],
) -> None:
    was = paho_speedups.installed()
    paho_speedups.uninstall()
    try:
        as_shipped = [_decoded(h, b) for h, b in captured]
        assert paho_speedups.install(), "this paho is the one the speed-up was written for"
        sped_up = [_decoded(h, b) for h, b in captured]
    finally:
        paho_speedups.uninstall()
        if was:
            paho_speedups.install()
    assert sped_up == as_shipped
    # The cases are real: one without properties, the others with what was published.
    assert as_shipped[0]["json"] == {}
    assert as_shipped[1]["json"]["UserProperty"] == [("schema", "telemetry/1"), ("schema", "again")]
    assert as_shipped[3]["json"]["CorrelationData"] == b"\x00\x01corr".hex()


def test_another_paho_version_runs_paho_as_shipped() -> None:
    assert paho_speedups.applies("2.2.0")
    assert paho_speedups.applies("2.2.7")
    assert not paho_speedups.applies("2.1.0")
    assert not paho_speedups.applies("3.0.0")
