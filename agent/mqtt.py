"""The agent's MQTT connection (paho-mqtt 2.x, CallbackAPIVersion.VERSION2).

- client id = device id, persistent session (MQTT 5 clean_start=False + session expiry,
  or 3.1.1 clean_session=False), so commands sent while the device is away arrive later;
- the will publishes a retained `online: false` status;
- reconnects by paho's own loop thread with a jittered exponential backoff;
- subscribes the device and group command topics at QoS 1 on every connect.

Commands are acknowledged manually: the network thread only hands the payload to the
command processor, which sends the PUBACK after the command's outcome (the job and its
RECEIVED or REJECTED event) is committed to disk. Until then the broker holds the
message in the persistent session and redelivers it after a crash or a reconnect, so a
command is durable without a second fsync on the latency path.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig
from protocol.topics import Topics
from protocol.transport import (
    BrokerAddress,
    BrokerList,
    diagnose_tls,
    paho_client,
    parse_broker_urls,
)

log = structlog.get_logger("jetfleet.agent.mqtt")

# Anything larger is not a command we could have sent (a deploy command is < 2 KiB); it
# is dropped before it reaches the disk.
MAX_COMMAND_BYTES = 256 * 1024
TLS_CHECK_MIN_INTERVAL_S = 0.5


Ack = Callable[[], None]

# MQTT 5 DISCONNECT reason "Session taken over": another client connected with our id.
SESSION_TAKEN_OVER = 142
# Brokers that just close the socket (Mosquitto 2.0) instead: this many sessions in a
# row, each ended by the broker within SHORT_SESSION_S of its connect, is a takeover too.
SHORT_SESSION_S = 5.0
SHORT_SESSIONS_FOR_TAKEOVER = 3


class AgentMqtt:
    def __init__(
        self,
        config: AgentConfig,
        *,
        on_command: Callable[[str, bytes, Ack, bool], None],
        will_payload: bytes,
        on_connected: Callable[[], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        documents: tuple[str, ...] = (),
        on_document: Callable[[str, bytes, Ack], None] | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.device_id = config.device_id
        self._on_command = on_command
        self._on_connected = on_connected
        self._on_published = on_published
        self._on_disconnected = on_disconnected
        self.connected = threading.Event()
        self.ever_connected = threading.Event()
        self._v5 = config.broker.protocol == "5"
        b = config.broker
        self.client, _ = paho_client(
            b.url,
            client_id=config.device_id,
            protocol=b.protocol,
            persistent=True,
            ca=b.ca,
            cert=b.cert,
            key=b.key,
            username=b.username,
            password=b.password,
            manual_ack=True,
        )
        # Bumped on every connect: a PUBACK for a message of an earlier connection must
        # not be sent (its mid may name another message now); the broker redelivers it.
        self.generation = 0
        self._gen_lock = threading.Lock()
        # 0 = unlimited: events that pile up while offline stay queued in order (they
        # are on disk too, in the outbox).
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(20)
        self.client.will_set(self.topics.status(self.device_id), will_payload, qos=1, retain=True)
        self._min_delay = b.reconnect_min_s
        self._max_delay = b.reconnect_max_s
        self._jitter()
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        # paho retries a failed TLS connect silently: say why, naming the file (see
        # _explain_connect_failure).
        self.client.on_connect_fail = self._handle_connect_fail
        self._tls_problem: str | None = None
        self._tls_checked_at = float("-inf")
        self._unreachable: str | None = None  # the cause last logged; None once connected
        self._connected_at = 0.0
        self._short_sessions = 0
        # A cluster's nodes (broker.url lists several): a stopped node sends the agent on
        # to the next one (see _next_broker).
        self._brokers = BrokerList(parse_broker_urls(b.url))
        self._stopping = False
        self.client.on_message = self._handle_message
        self.client.on_publish = self._handle_publish
        self.client.on_socket_open = self._handle_socket_open
        self._subscribe_topics = [self.topics.device_cmd(self.device_id)] + [
            self.topics.group_cmd(g) for g in config.groups
        ]
        # Retained desired-state documents (releases, pins): re-sent on every subscribe.
        self._documents = set(documents)
        self._on_document = on_document
        self._subscribe_topics += sorted(self._documents)

    def _jitter(self) -> None:
        # A fleet that lost its broker must not reconnect in lockstep: randomize the first
        # delay; paho doubles it per failed attempt up to the max.
        first = random.uniform(self._min_delay, self._min_delay * 2)
        self.client.reconnect_delay_set(first, self._max_delay)  # type: ignore[arg-type]

    @property
    def _addr(self) -> BrokerAddress:
        """The broker node of the current (or last) connect attempt."""
        return self._brokers.current

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._connect_async(self._addr)
        self.client.loop_start()

    def _connect_async(self, addr: BrokerAddress) -> None:
        props: Properties | None = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.broker.session_expiry_s
        self.client.connect_async(
            addr.host,
            addr.port,
            keepalive=self.config.broker.keepalive_s,
            clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )

    def stop(self, final_status: bytes | None = None) -> None:
        """Publish the last status (online false) then disconnect cleanly."""
        self._stopping = True  # our own disconnect: no next node
        try:
            if final_status is not None and self.client.is_connected():
                info = self.client.publish(
                    self.topics.status(self.device_id), final_status, qos=1, retain=True
                )
                info.wait_for_publish(timeout=2.0)
            self.client.disconnect()
        except Exception as e:  # stopping must not fail on a dead socket
            log.warning("mqtt_stop_error", error=str(e))
        self.client.loop_stop()

    # ---- publishing -----------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> int:
        """Queue a publish; returns its mid (paho keeps QoS 1 messages across reconnects)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return int(info.mid)

    def publish_status(self, payload: bytes) -> None:
        self.client.publish(self.topics.status(self.device_id), payload, qos=1, retain=True)

    def publish_telemetry(self, payload: bytes) -> None:
        # QoS 0 and only when connected: stale samples are worth nothing, and paho would
        # otherwise queue them in memory for as long as the broker is away.
        if self.client.is_connected():
            self.client.publish(self.topics.telemetry(self.device_id), payload, qos=0)

    # ---- callbacks (paho's network thread) ------------------------------------------
    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("mqtt_connect_refused", reason=str(reason))
            return
        with self._gen_lock:
            self.generation += 1
        self._brokers.established()
        self.connected.set()
        self.ever_connected.set()
        self._connected_at = time.monotonic()
        self._unreachable = None  # a later failure is news again
        self._tls_problem = None  # a later TLS failure is news again
        self._jitter()
        client.subscribe([(t, 1) for t in self._subscribe_topics])
        log.info(
            "mqtt_connected",
            broker=self._addr.url,
            session_present=bool(getattr(flags, "session_present", False)),
        )
        if self._on_connected:
            try:
                self._on_connected()
            except Exception:
                log.exception("on_connected_failed")

    def _handle_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle on: an event written right after the PUBACK of its command
        # would wait for the broker's delayed ACK (40 ms on Linux). Small, latency-bound
        # messages are all we send, so turn it off.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        self._explain_unreachable()
        self._explain_connect_failure()
        self._next_broker()

    def _next_broker(self) -> None:
        """After a lost connection or a failed attempt, point paho's next attempt at the
        node the broker list names (BrokerList says why this is the place)."""
        before = self._addr
        node = None if self._stopping else self._brokers.move_on()
        if node is not None:
            log.warning("mqtt_next_broker", broker=node.url, previous=before.url)
            self._connect_async(node)

    def _explain_unreachable(self) -> None:
        """paho retries a failed connect silently: say at once why the broker cannot be
        reached (refused, unknown host, timed out), again only when the cause changes.
        TLS brokers are diagnosed by _explain_connect_failure, TCP included."""
        if self._addr.tls:
            return
        try:
            with socket.create_connection((self._addr.host, self._addr.port), timeout=3.0):
                return  # reachable by now: the next attempt will tell
        except OSError as e:
            cause = e.strerror or str(e) or type(e).__name__
        if cause != self._unreachable:
            log.error(
                "mqtt_unreachable",
                broker=self._addr.url,
                reason=cause,
                retry_max_s=self._max_delay,
            )
        self._unreachable = cause

    def _explain_connect_failure(self) -> None:
        """After every failed connect over TLS, find out why the broker will not have us
        (wrong CA, broker name, refused, expired or revoked certificate) and log it once
        per distinct reason: the one line an operator needs. The reason can change between
        attempts (unreachable, then up with a CRL naming us), so each attempt is checked;
        the reconnect backoff bounds how often."""
        if not self._addr.tls:
            return
        now = time.monotonic()
        if now - self._tls_checked_at < TLS_CHECK_MIN_INTERVAL_S:
            return  # paho reported this attempt twice (connect_fail, then disconnect)
        self._tls_checked_at = now
        b = self.config.broker
        reason = diagnose_tls(self._addr, b.ca, b.cert, b.key, timeout=5.0)
        if reason and reason != self._tls_problem:
            log.error("mqtt_tls_problem", broker=self._addr.url, reason=reason)
        self._tls_problem = reason

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        established = self.connected.is_set()
        self.connected.clear()
        self._jitter()
        if not established:
            # A connect that failed before CONNACK, first or any later one. Under TLS 1.3
            # a broker refuses a client certificate (e.g. revoked) only after the
            # handshake, which paho reports as this disconnect: say why, on every attempt.
            self._explain_connect_failure()
        if not self._explain_takeover(reason):
            log.warning("mqtt_disconnected", reason=str(reason), **self._known_problem(established))
        self._next_broker()
        if self._on_disconnected:
            self._on_disconnected()

    def _known_problem(self, established: bool) -> dict[str, str]:
        return {} if established or not self._tls_problem else {"tls": self._tls_problem}

    def _explain_takeover(self, reason: Any) -> bool:
        """Name a session takeover as such, with its likely cause: two agents with one
        device_id knock each other off the broker for as long as both run. True if this
        disconnect was logged as one."""
        ours = getattr(reason, "value", None) == 0  # our own clean disconnect (stop)
        by_broker = (
            not ours and self.connected_for() < SHORT_SESSION_S and self.ever_connected.is_set()
        )
        self._short_sessions = self._short_sessions + 1 if by_broker else 0
        taken = getattr(reason, "value", None) == SESSION_TAKEN_OVER
        if not taken and self._short_sessions < SHORT_SESSIONS_FOR_TAKEOVER:
            return False
        log.error(
            "mqtt_session_taken_over",
            reason=str(reason)
            if taken
            else f"{self._short_sessions} sessions in a row ended "
            f"by the broker within {SHORT_SESSION_S:g}s of connecting ({reason})",
            likely_cause=f"another client connected with client id {self.device_id!r}: is a "
            "second agent running with the same device_id (a copied agent.toml)?",
        )
        return True

    def connected_for(self) -> float:
        """Seconds since the last successful connect."""
        return time.monotonic() - self._connected_at

    def _ack_later(self, mid: int, qos: int) -> Ack:
        gen = self.generation

        def ack() -> None:
            with self._gen_lock:
                current = gen == self.generation
            if current and qos > 0:
                self.client.ack(mid, qos)

        ack.stale = lambda: gen != self.generation  # type: ignore[attr-defined]
        return ack

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        ack = self._ack_later(msg.mid, msg.qos)
        try:
            payload = bytes(msg.payload)
            if len(payload) > MAX_COMMAND_BYTES:
                log.warning(
                    "command_dropped", topic=msg.topic, reason="too large", size=len(payload)
                )
                ack()
                return
            if msg.topic in self._documents and self._on_document is not None:
                self._on_document(msg.topic, payload, ack)
                return
            self._on_command(msg.topic, payload, ack, bool(msg.dup))
        except Exception:
            # Never let a payload kill the network thread (e.g. a full disk while storing).
            log.exception("command_enqueue_failed", topic=msg.topic)

    def _handle_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        if self._on_published:
            self._on_published(mid)
