"""The controller's MQTT client (paho-mqtt 2.x, callback API VERSION2).

Publishes commands at QoS 1 and waits for the broker's PUBACK, so "published" in the
rollout store means the broker has the command (it then holds it for offline devices in
their persistent sessions). Incoming status and events are handed, raw, to a callback on
paho's network thread; the rollout engine queues them and does all SQLite work on its own
thread.

The rollout driver connects with a persistent session under a client id derived from the
rollout id: if the controller is killed, the broker keeps queuing the devices' events
(which are not retained) and delivers them when `rollout resume` reconnects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.errors import CodedError
from protocol.transport import (
    BrokerAddress,
    BrokerList,
    connect_first,
    diagnose_tls,
    paho_client,
    parse_broker_urls,
)

log = structlog.get_logger("jetfleet.controller.mqtt")

MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained
# How long a persistent controller session outlives a dead controller at the broker.
SESSION_EXPIRY_S = 7 * 24 * 3600


class MqttError(CodedError, RuntimeError):
    """The broker could not be reached, refused us, or did not acknowledge in time."""

    code = "mqtt"


@dataclass(frozen=True)
class MqttOptions:
    broker: str
    protocol: str = "5"  # "5" | "3.1.1"
    ca: str = ""
    cert: str = ""
    key: str = ""
    client_id: str = ""
    persistent: bool = False  # keep the session (and queued QoS 1 messages) across restarts
    keepalive: int = 30


class ControllerMqtt:
    """A connected client: `with ControllerMqtt(opts, on_message) as m: m.publish(...)`."""

    def __init__(self, options: MqttOptions, on_message: MessageHandler | None = None) -> None:
        self.options = options
        self._on_message = on_message
        self._v5 = options.protocol == "5"
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._subscriptions: list[str] = []
        self._suback: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._started = False
        if options.persistent and not options.client_id:
            raise ValueError("a persistent MQTT session needs a fixed client id")
        self.client, _ = paho_client(
            options.broker,
            client_id=options.client_id,
            protocol=options.protocol,
            persistent=options.persistent,
            ca=options.ca,
            cert=options.cert,
            key=options.key,
        )
        # Rollouts publish one command per device in a burst: let paho pipeline them.
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 10)
        # `broker` may list a cluster's nodes: a lost connection or a failed attempt moves
        # paho's next attempt on to the node the list names (see _next_broker).
        self._brokers = BrokerList(parse_broker_urls(options.broker))
        self._closing = False
        self.client.on_connect_fail = lambda client, userdata: self._next_broker()
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message
        self.client.on_subscribe = self._handle_subscribe

    def set_handler(self, handler: MessageHandler | None) -> None:
        """Where incoming messages go from now on (called on paho's network thread)."""
        self._on_message = handler

    @property
    def address(self) -> BrokerAddress:
        """The broker node of the current (or last) connect attempt."""
        return self._brokers.current

    # -- lifecycle ---------------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> ControllerMqtt:
        self._closing = False
        self._first_connect()
        self.client.loop_start()
        self._started = True
        if not self._connected.wait(timeout):
            self.close()
            reason = (
                self._connect_error or self._tls_diagnosis() or f"no CONNACK within {timeout:.0f}s"
            )
            raise MqttError(f"broker {self.address.url}: {reason}")
        if self._connect_error:
            self.close()
            raise MqttError(
                f"broker {self.address.url} refused the connection: {self._connect_error}"
            )
        return self

    def _connect_args(self) -> dict[str, Any]:
        props = None
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S if self.options.persistent else 0
            clean_start = not self.options.persistent
        keepalive = self.options.keepalive
        return {"keepalive": keepalive, "clean_start": clean_start, "properties": props}

    def _connect_async(self, addr: BrokerAddress) -> None:
        self.client.connect_async(addr.host, addr.port, **self._connect_args())

    def _first_connect(self) -> None:
        """Open the socket to the first node that takes it, in the list's order."""
        try:
            connect_first(self.client, self._brokers, **self._connect_args())
        except (OSError, ValueError) as error:
            raise MqttError(
                self._tls_diagnosis() or f"cannot connect to broker {self.options.broker}: {error}"
            ) from error

    def _tls_diagnosis(self) -> str | None:
        """After a failed connect over TLS: why the broker will not have us, naming the file
        to fix (a TLS 1.3 broker refuses a client certificate only after the handshake,
        which paho reports as a bare lost connection). None when TLS is not the problem."""
        if not self.address.tls:
            return None
        o = self.options
        return diagnose_tls(self.address, o.ca, o.cert, o.key, timeout=5.0)

    def _next_broker(self) -> None:
        """After a lost connection or a failed attempt, point paho's next attempt at the
        node the broker list names (BrokerList says why this is the place)."""
        before = self.address
        node = None if self._closing else self._brokers.move_on()
        if node is not None:
            log.warning("mqtt_next_broker", broker=node.url, previous=before.url)
            self._connect_async(node)

    def close(self) -> None:
        self._closing = True
        self._started = False
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> ControllerMqtt:
        return self if self._started else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self.client.is_connected()

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: object,
        properties: Properties | None,
    ) -> None:
        if getattr(reason_code, "is_failure", False):
            self._connect_error = str(reason_code)
            self._connected.set()
            return
        self._connect_error = None
        self._brokers.established()
        log.info("mqtt_connected", broker=self.address.url, session_present=flags.session_present)
        # Resubscribe after a reconnect: a clean session has lost them, a persistent one
        # keeps them and re-subscribing is harmless.
        with self._lock:
            topics = list(self._subscriptions)
        if topics:
            client.subscribe([(t, 1) for t in topics])
        self._connected.set()

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: object,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if getattr(reason_code, "value", 0) != 0:
            log.warning("mqtt_disconnected", broker=self.address.url, reason=str(reason_code))
        self._next_broker()

    def _handle_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:  # the network thread must survive any handler bug
            log.exception("mqtt_handler_failed", topic=msg.topic)

    def _handle_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: Any,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            ev = self._suback.pop(mid, None)
        if ev is not None:
            ev.set()

    # -- operations --------------------------------------------------------------------
    def subscribe(self, topics: Iterable[str], timeout: float = 10.0) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK (retained messages follow it)."""
        topics = list(topics)
        with self._lock:
            self._subscriptions.extend(t for t in topics if t not in self._subscriptions)
            rc, mid = self.client.subscribe([(t, 1) for t in topics])
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise MqttError(f"subscribe to {topics} failed: {mqtt.error_string(rc)}")
            ev = threading.Event()
            self._suback[mid] = ev
        if not ev.wait(timeout):
            raise MqttError(f"broker did not acknowledge the subscription to {topics}")

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 30
    ) -> None:
        """Publish and wait until the broker acknowledged it (PUBACK for QoS 1)."""
        self.wait_all([self.publish_nowait(topic, payload, qos=qos, retain=retain)], timeout)

    @staticmethod
    def wait_all(infos: Iterable[mqtt.MQTTMessageInfo], timeout: float = 30) -> None:
        """Wait for every publish to be acknowledged; MqttError when some are not in time."""
        deadline = time.monotonic() + timeout
        pending = list(infos)
        for info in pending:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                raise MqttError(f"publish not acknowledged: {e}") from e
        missing = sum(1 for i in pending if not i.is_published())
        if missing:
            raise MqttError(
                f"{missing} of {len(pending)} publishes not acknowledged within {timeout:.0f}s"
            )
