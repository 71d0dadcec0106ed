"""Telemetry ingestion: MQTT in, SQLite out, nothing lost silently.

Three threads. paho's network thread only checks size, decodes and validates each
sample (pydantic, from the raw bytes) and appends the row to a bounded queue; a writer
thread takes everything queued and writes it in one transaction; a third runs retention
and downsampling every `maintenance_interval_s` (one process per database at a time).
A sample that is oversized, not JSON, of another schema, invalid, published on another
device's topic, or that finds the queue full, is dropped: counted by reason
(`stats.dropped`) and logged (first time, then at most every 10 s per reason with the
running count).

On MQTT 5 the subscription is shared (`$share/<group>/jetfleet/v1/devices/+/telemetry`)
so several `jetfleet serve` processes split the stream; on 3.1.1 it is a plain one.
Retained device status is subscribed in full by every ingester (it says who is online).
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from pydantic import ValidationError

from controller.telemetry import paho_speedups
from controller.telemetry.store import RAW_RETENTION_S, Row, TelemetryStore, row_from_sample
from protocol.errors import ProtocolError, SchemaError
from protocol.messages import DeviceStatus
from protocol.telemetry import TelemetrySample
from protocol.topics import DEFAULT_PREFIX, Topics
from protocol.transport import BrokerList, connect_first, paho_client, parse_broker_urls

log = structlog.get_logger(__name__)

MAX_SAMPLE_BYTES = 64 * 1024


DROP_REASONS = ("oversized", "malformed", "schema", "topic_mismatch", "queue_full")


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    batches: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    last_batch_s: float = 0.0
    maintenance_runs: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "stored": self.stored,
            "batches": self.batches,
            "dropped": dict(self.dropped),
            "maintenance_runs": self.maintenance_runs,
        }


def make_client(
    broker_url: str,
    *,
    protocol: str = "5",
    client_id: str | None = None,
    ca: str = "",
    cert: str = "",
    key: str = "",
) -> tuple[mqtt.Client, str, int]:
    """A paho 2.x client for the controller side (clean session), and host/port."""
    cid = client_id or f"jetfleet-ctl-{uuid.uuid4().hex[:12]}"
    client, addr = paho_client(
        broker_url, client_id=cid, protocol=protocol, ca=ca, cert=cert, key=key
    )
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client, addr.host, addr.port


class _DropLog:
    """Every drop is counted; the log line comes once per reason, then every 10 s."""

    def __init__(self, stats: IngestStats, interval_s: float = 10.0) -> None:
        self.stats = stats
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def __call__(self, reason: str, topic: str, detail: str) -> None:
        self.stats.dropped[reason] += 1
        now = time.monotonic()
        last = self._last.get(reason)
        if last is None or now - last >= self.interval_s:
            self._last[reason] = now
            log.warning(
                "telemetry_dropped",
                reason=reason,
                topic=topic,
                detail=detail[:300],
                dropped_total=self.stats.dropped[reason],
            )


class TelemetryIngester:
    """`start()` connects and runs; `stop()` drains the queue into SQLite and disconnects."""

    def __init__(
        self,
        store_path: str | Path,
        broker_url: str,
        *,
        protocol: str = "5",
        share_group: str | None = "jetfleet",
        prefix: str = DEFAULT_PREFIX,
        ca: str = "",
        cert: str = "",
        key: str = "",
        max_sample_bytes: int = MAX_SAMPLE_BYTES,
        queue_max: int = 200_000,
        batch_max: int = 10_000,
        idle_wait_s: float = 0.05,
        maintenance_interval_s: float = 60.0,
        raw_retention_s: float = RAW_RETENTION_S,
        on_status: Callable[[DeviceStatus], None] | None = None,
        subscribe_status: bool = True,
        on_batch: Callable[[IngestStats], None] | None = None,
    ) -> None:
        self.store_path = store_path
        self.topics = Topics(prefix)
        self.protocol = protocol
        self.share_group = share_group
        self.max_sample_bytes = max_sample_bytes
        self.queue_max = queue_max
        self.batch_max = batch_max
        self.idle_wait_s = idle_wait_s
        self.maintenance_interval_s = maintenance_interval_s
        self.raw_retention_s = raw_retention_s
        self.on_status = on_status
        self.subscribe_status = subscribe_status
        self.on_batch = on_batch
        self.stats = IngestStats()
        self.status: dict[str, DeviceStatus] = {}
        self._queue: collections.deque[Row] = collections.deque()
        self._drop = _DropLog(self.stats)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._closing = False
        self._wake = threading.Event()
        self._messages = 0
        self._net: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._maintainer: threading.Thread | None = None
        self._head = self.topics.prefix + "/devices/"
        if protocol == "5":
            paho_speedups.install()
        self.broker_url = broker_url
        # A cluster's nodes (a comma-separated list): a lost node sends the next attempt
        # on to the next one (see _net_loop).
        self._brokers = BrokerList(parse_broker_urls(broker_url))
        self.client, _, _ = make_client(broker_url, protocol=protocol, ca=ca, cert=cert, key=key)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self._telemetry_mid: int | None = None
        self.client.on_message = self._on_message
        # Open (and create) the database now, so a bad path fails `start`, not a thread.
        TelemetryStore(self.store_path).close()

    @property
    def telemetry_subscription(self) -> str:
        if self.protocol == "5" and self.share_group:
            return self.topics.shared_telemetry(self.share_group)
        return self.topics.all_telemetry()

    # -- lifecycle -------------------------------------------------------------------

    def start(self, connect_timeout: float = 10.0) -> None:
        self._stop.clear()
        self._closing = False
        self._wake.clear()
        self._writer = threading.Thread(target=self._write_loop, name="telemetry-writer")
        self._writer.start()
        if self.maintenance_interval_s != float("inf"):
            self._maintainer = threading.Thread(
                target=self._maintain_loop, name="telemetry-maintenance", daemon=True
            )
            self._maintainer.start()
        try:
            connect_first(self.client, self._brokers, **self._connect_args())
        except (OSError, ValueError) as e:
            self._stop.set()
            self._writer.join()
            self._writer = None
            self._join_maintainer()
            raise ConnectionError(
                f"telemetry ingester: cannot connect to {self.broker_url}: {e}"
            ) from e
        self._net = threading.Thread(target=self._net_loop, name="telemetry-mqtt", daemon=True)
        self._net.start()
        if not self._connected.wait(connect_timeout):
            self.stop()
            raise ConnectionError(
                f"telemetry ingester: no CONNACK + SUBACK from {self.broker_url} "
                f"within {connect_timeout:.0f}s"
            )

    def _connect_args(self) -> dict[str, Any]:
        # A clean session: telemetry is QoS 0, nothing is worth keeping across connects.
        return {"keepalive": 30, "clean_start": True} if self.protocol == "5" else {"keepalive": 30}

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Leave the subscription, disconnect, and write everything queued: a stopped
        ingester loses nothing (a killed one loses what was in flight to it)."""
        self._leave_subscription(drain_timeout)
        self._closing = True
        self._wake.set()
        self.client.disconnect()
        if self._net is not None:
            self._net.join(10)
            self._net = None
        self._stop.set()
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._join_maintainer()

    def _join_maintainer(self) -> None:
        # A fold of a big database can run for seconds; it is a transaction, so leaving
        # it mid-way (daemon thread, process exit) loses nothing.
        if self._maintainer is not None:
            self._maintainer.join(30)
            self._maintainer = None

    def _leave_subscription(self, timeout: float) -> None:
        """Unsubscribe and read on until the UNSUBACK: what the broker sent before it is
        ahead of it on the socket, and what comes after goes to the shared subscription's
        other members. A plain disconnect would drop what was still on the way."""
        if self._net is None or not self._connected.is_set():
            return
        left = threading.Event()
        self.client.on_unsubscribe = lambda *args: left.set()
        self.client.unsubscribe(self.telemetry_subscription)
        if not left.wait(timeout):
            log.warning("ingest_unsubscribe_unanswered", timeout_s=timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_stored(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats.stored >= n:
                return True
            time.sleep(0.01)
        return self.stats.stored >= n

    # -- network thread --------------------------------------------------------------

    def _net_loop(self) -> None:
        """paho's loop_forever without one select() per message: once loop() has found
        data, loop_read() goes on while packets keep arriving (about a tenth less CPU per
        sample, measured). Lost connections are retried with backoff, 1 s to 30 s, on the
        node the broker list names next; on_connect subscribes again."""
        c, ok = self.client, mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
        delay = 1.0
        while not self._closing:
            if c.loop(timeout=1.0) == ok:
                delay = 1.0
                # Bounded, so loop() (keepalive pings, writes) still runs regularly.
                for _ in range(5000):
                    seen = self._messages
                    if c.loop_read() != ok or self._messages == seen:
                        break
                continue
            if self._closing or self._wake.wait(delay):
                break
            delay = min(delay * 2, 30.0)
            node = self._brokers.move_on()
            if node is not None:
                log.warning("mqtt_next_broker", broker=node.url)
                c.connect_async(node.host, node.port, **self._connect_args())
            try:
                c.reconnect()
            except (OSError, ValueError) as e:
                log.warning("ingest_reconnect_failed", reason=str(e), retry_in_s=delay)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any
    ) -> None:
        if reason_code.is_failure:
            log.error("ingest_connect_refused", reason=str(reason_code))
            return
        self._brokers.established()
        if self.subscribe_status:
            client.subscribe(self.topics.all_status(), qos=1)
        # Telemetry last: "connected" is announced on its SUBACK (see _on_subscribe), so a
        # caller that waited for it cannot publish a QoS 0 sample the broker drops for us.
        _, self._telemetry_mid = client.subscribe(self.telemetry_subscription, qos=0)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        if mid != self._telemetry_mid:
            return
        if any(rc.is_failure for rc in reason_codes):
            log.error("ingest_subscribe_refused", subscription=self.telemetry_subscription)
            return
        self._connected.set()
        log.info("ingest_connected", subscription=self.telemetry_subscription)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any
    ) -> None:
        self._connected.clear()
        if not self._closing:
            log.warning("ingest_disconnected", reason=str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._messages += 1
        topic = msg.topic
        if topic.endswith("/status"):
            self._handle_status(topic, bytes(msg.payload))
            return
        self.stats.received += 1
        payload = msg.payload
        if len(payload) > self.max_sample_bytes:
            self._drop("oversized", topic, f"{len(payload)} bytes > cap of {self.max_sample_bytes}")
            return
        try:
            sample = TelemetrySample.model_validate_json(payload)
        except SchemaError as e:
            self._drop("schema", topic, e.reason)
            return
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "document"
            self._drop("malformed", topic, f"{where}: {err['msg']}")
            return
        except ProtocolError as e:
            self._drop("malformed", topic, e.reason)
            return
        # The topic says who published (broker ACLs bind it to the client); a sample
        # claiming another device's id is refused rather than trusted.
        expected = self._head + sample.device_id + "/telemetry"
        if topic != expected:
            self._drop("topic_mismatch", topic, f"sample claims device {sample.device_id!r}")
            return
        if len(self._queue) >= self.queue_max:
            self._drop("queue_full", topic, f"writer is {self.queue_max} samples behind")
            return
        self._queue.append(row_from_sample(sample, payload.decode("utf-8")))

    def _handle_status(self, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained message
            return
        try:
            status = DeviceStatus.decode(payload)
        except ProtocolError as e:
            log.warning("status_ignored", topic=topic, reason=e.reason)
            return
        self.status[status.device_id] = status
        if self.on_status is not None:
            self.on_status(status)

    # -- writer thread ---------------------------------------------------------------

    def _write_loop(self) -> None:
        store = TelemetryStore(self.store_path)
        try:
            while True:
                stopping = self._stop.is_set()
                batch = self._take()
                if batch:
                    self._write(store, batch)
                elif stopping:
                    break
                else:
                    self._stop.wait(self.idle_wait_s)
        finally:
            store.close()

    def _take(self) -> list[Row]:
        q, n = self._queue, min(len(self._queue), self.batch_max)
        return [q.popleft() for _ in range(n)]

    def _write(self, store: TelemetryStore, batch: list[Row]) -> None:
        t0 = time.perf_counter()
        while True:
            try:
                store.insert_batch(batch)
                break
            except Exception as e:  # e.g. "database is locked" or a full disk
                log.error("telemetry_write_failed", rows=len(batch), reason=str(e))
                if self._stop.wait(1.0):
                    # Shutting down with a database that refuses writes: say what is lost.
                    self.stats.dropped["write_failed"] += len(batch)
                    return
        self.stats.last_batch_s = time.perf_counter() - t0
        self.stats.stored += len(batch)
        self.stats.batches += 1
        if self.on_batch is not None:
            self.on_batch(self.stats)

    # -- maintenance thread ----------------------------------------------------------

    def _maintain_loop(self) -> None:
        """Downsampling and retention on their own connection: a fold of a minute of a
        big fleet takes seconds, which the writer would otherwise spend not writing."""
        store = TelemetryStore(self.store_path)
        try:
            while not self._stop.wait(self.maintenance_interval_s):
                self._maintain(store)
        finally:
            store.close()

    def _maintain(self, store: TelemetryStore) -> None:
        try:
            counts = store.maintain(raw_retention_s=self.raw_retention_s)
            self.stats.maintenance_runs += 1
            log.info("telemetry_maintenance", **counts)
        except Exception as e:
            log.error("telemetry_maintenance_failed", reason=str(e))


# -- several processes -------------------------------------------------------------------

_STAT_FIELDS = ("received", "stored", "batches")
_DROP_FIELDS = (*DROP_REASONS, "write_failed")


def _publish_stats(shared: Any, stats: IngestStats) -> None:
    shared[0], shared[1], shared[2] = stats.received, stats.stored, stats.batches
    for i, reason in enumerate(_DROP_FIELDS, 3):
        shared[i] = stats.dropped.get(reason, 0)


def _worker_main(
    store_path: str | Path,
    broker_url: str,
    kwargs: dict[str, Any],
    stop: Any,
    ready: Any,
    shared: Any,
) -> None:
    """One extra ingester process: telemetry only (the parent follows status and runs
    retention), its counters mirrored into shared memory after every batch."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    ing = TelemetryIngester(
        store_path,
        broker_url,
        subscribe_status=False,
        maintenance_interval_s=float("inf"),
        on_batch=lambda st: _publish_stats(shared, st),
        **kwargs,
    )
    ing.start()
    ready.set()
    while not stop.value:
        _publish_stats(shared, ing.stats)
        time.sleep(0.5)
    ing.stop()
    _publish_stats(shared, ing.stats)


class IngestPool:
    """A TelemetryIngester in this process plus `workers - 1` more in their own processes,
    all members of one MQTT 5 shared subscription writing the same database: ingestion
    uses as many cores as there are workers (one Python process is bound by its GIL)."""

    def __init__(
        self, workers: int, store_path: str | Path, broker_url: str, **kwargs: Any
    ) -> None:
        if workers < 1:
            raise ValueError(f"ingest workers must be >= 1, not {workers}")
        if workers > 1 and (
            kwargs.get("protocol", "5") != "5" or not kwargs.get("share_group", "jetfleet")
        ):
            raise ValueError(
                "several ingest workers need an MQTT 5 shared subscription "
                "(protocol 5 and a share group); on MQTT 3.1.1 each would get every sample"
            )
        import multiprocessing as mp

        self._mp = mp.get_context("spawn")
        self.main = TelemetryIngester(store_path, broker_url, **kwargs)
        own = (
            "on_status",
            "subscribe_status",
            "on_batch",
            "maintenance_interval_s",
            "raw_retention_s",
        )
        self._kwargs = {k: v for k, v in kwargs.items() if k not in own}
        self._store_path, self._broker_url = store_path, broker_url
        # A flag, not an Event: Event.set() waits for every process asleep on it to wake,
        # and a worker killed (kill -9, the OOM killer) while asleep never does.
        self._stop = self._mp.RawValue("b", 0)
        self._procs: list[Any] = []
        self._shared: list[Any] = []
        self._ready: list[Any] = []
        self.workers = workers

    @property
    def status(self) -> dict[str, DeviceStatus]:
        return self.main.status

    @property
    def worker_pids(self) -> list[int]:
        """The extra processes' pids (the main ingester runs in this process)."""
        return [p.pid for p in self._procs]

    @property
    def stats(self) -> IngestStats:
        total = IngestStats(
            received=self.main.stats.received,
            stored=self.main.stats.stored,
            batches=self.main.stats.batches,
            dropped=collections.Counter(self.main.stats.dropped),
            maintenance_runs=self.main.stats.maintenance_runs,
        )
        for sh in self._shared:
            vals = list(sh)
            total.received += vals[0]
            total.stored += vals[1]
            total.batches += vals[2]
            for i, reason in enumerate(_DROP_FIELDS, 3):
                if vals[i]:
                    total.dropped[reason] += vals[i]
        return total

    def start(self, timeout: float = 30.0) -> None:
        self.main.start()
        for _ in range(self.workers - 1):
            shared = self._mp.RawArray("q", len(_STAT_FIELDS) + len(_DROP_FIELDS))
            ready = self._mp.Event()
            p = self._mp.Process(
                target=_worker_main,
                args=(self._store_path, self._broker_url, self._kwargs, self._stop, ready, shared),
                name="jetfleet-ingest",
                daemon=True,
            )
            p.start()
            self._procs.append(p)
            self._shared.append(shared)
            self._ready.append(ready)
        deadline = time.monotonic() + timeout
        for p, ready in zip(self._procs, self._ready, strict=True):
            while not ready.wait(0.1):
                if not p.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    why = f"exited with {p.exitcode}" if not p.is_alive() else "did not connect"
                    raise ConnectionError(f"ingest worker {p.pid} {why} (see its log above)")
        log.info("ingest_pool_started", workers=self.workers)

    def stop(self) -> None:
        self._stop.value = 1
        for p in self._procs:
            p.join(30)
            if p.exitcode not in (None, 0):
                log.error("ingest_worker_died", pid=p.pid, exitcode=p.exitcode)
            if p.is_alive():
                log.error("ingest_worker_stuck", pid=p.pid)
                p.terminate()
                p.join(5)
        self.main.stop()

    def wait_connected(self, timeout: float) -> bool:
        return self.main.wait_connected(timeout)
