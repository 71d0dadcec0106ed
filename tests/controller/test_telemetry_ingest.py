"""Ingestion through a real Mosquitto into real SQLite: three agents (one the real sampler
on its TelemetryLoop), bad samples dropped with counted and logged reasons, shared
subscriptions splitting the stream, and retention with 1-minute downsampling."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from structlog.testing import capture_logs

from agent.telemetry.loop import TelemetryLoop
from agent.telemetry.sampler import TelemetrySampler
from controller.sandbox.localbroker import LocalMosquitto, free_port
from controller.telemetry.ingest import IngestPool, TelemetryIngester
from controller.telemetry.store import (
    MAINTAIN_LOCK,
    TelemetryStore,
    default_telemetry_db,
    row_from_sample,
)
from protocol.messages import DeviceStatus
from protocol.telemetry import TelemetrySample
from protocol.topics import Topics


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands configure structlog for the process (bound to the stderr of their
    moment); start and end each test with the default configuration."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


TOPICS = Topics()


def sample(device: str, i: int = 0, at: float | None = None, **extra: Any) -> TelemetrySample:
    when = datetime.fromtimestamp(at if at is not None else time.time(), timezone.utc)
    fields: dict[str, Any] = {
        "device_id": device,
        "at": when,
        "uptime_s": 100.0 + i,
        "cpu": {"percent": [10.0 + i, 30.0], "load1": 0.5},
        "mem": {"total": 8_000_000_000, "used": 3_000_000_000, "available": 5_000_000_000},
        "disk_free_bytes": 20_000_000_000,
        "temps": {"cpu": 50.0 + i},
        "gpu": {
            "source": "tegrastats",
            "load_pct": 40.0,
            "power_mw": {"VDD_IN": 6000.0, "VDD_SOC": 1500.0},
            "temp_c": 47.5,
        },
        "models": {"detector": {"version": "1.2.0", "p50_ms": 2.0, "p99_ms": 6.5, "count": 90}},
        "jobs": {"done": 3, "failed": 1},
    }
    fields.update(extra)
    return TelemetrySample.new(**fields)


class Publisher:
    """An agent's MQTT connection, as far as telemetry goes."""

    def __init__(self, broker: LocalMosquitto, device: str) -> None:
        self.device = device
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"agent-{device}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, payload: bytes, topic: str | None = None) -> None:
        info = self.client.publish(topic or TOPICS.telemetry(self.device), payload, qos=0)
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ingester(mosquitto: LocalMosquitto, tmp_path: Path) -> Iterator[TelemetryIngester]:
    ing = TelemetryIngester(tmp_path / "telemetry.db", mosquitto.url, idle_wait_s=0.01)
    ing.start()
    yield ing
    ing.stop()


def wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def test_three_agents_samples_arrive_in_sqlite_one_from_the_real_sampler(
    mosquitto: LocalMosquitto, ingester: TelemetryIngester, tmp_path: Path
) -> None:
    pubs = [Publisher(mosquitto, d) for d in ("robot-a", "robot-b", "robot-c")]
    sampler = TelemetrySampler(
        tmp_path / "agent-data",
        lambda: {"device_id": "robot-c", "jobs": {"done": 2, "failed": 0}},
        gpu="none",
        sysfs_root=tmp_path,
    )
    loop = TelemetryLoop(sampler, pubs[2].publish, interval_s=0.05)
    try:
        loop.start()
        for i in range(5):
            pubs[0].publish(sample("robot-a", i).encode())
            pubs[1].publish(sample("robot-b", i).encode())
        assert wait_for(lambda: ingester.stats.stored >= 13)
        loop.stop()
    finally:
        loop.stop()
        for p in pubs:
            p.close()
    assert ingester.wait_stored(10 + loop.published, 10)
    store = TelemetryStore(ingester.store_path, readonly=True)
    try:
        assert store.count_raw("robot-a") == 5 and store.count_raw("robot-b") == 5
        assert store.count_raw("robot-c") == loop.published >= 3
        assert store.devices() == ["robot-a", "robot-b", "robot-c"]
        rows = list(store.raw_rows("robot-a", 0))
        assert [r["cpu_pct"] for r in rows] == [20.0, 20.5, 21.0, 21.5, 22.0]
        assert rows[0]["power_w"] == 6.0 and rows[0]["temp_max"] == 50.0
        assert rows[0]["gpu_load"] == 40.0 and rows[0]["mem_used"] == 3_000_000_000
        # The real sampler's sample is stored as sent, gpu null included.
        real = json.loads(next(iter(store.raw_rows("robot-c", 0)))["payload"])
        assert real["gpu"] is None and real["jobs"] == {"done": 2, "failed": 0}
        assert real["mem"]["total"] > 0
        latest = {x.device_id: x for x in store.latest()}
        assert latest["robot-a"].sample().uptime_s == 104.0
    finally:
        store.close()
    assert ingester.stats.dropped == {}


@pytest.mark.parametrize(
    ("payload", "topic_device", "reason", "detail"),
    [
        (b"{not json", "robot-a", "malformed", "Invalid JSON"),
        (b'{"schema":"jetfleet.telemetry/v2","device_id":"robot-a"}', "robot-a", "schema", "v2"),
        (b'{"schema":"jetfleet.status/v1"}', "robot-a", "schema", "status"),
        (
            b'{"schema":"jetfleet.telemetry/v1","device_id":"robot-a","at":"2026-01-01T00:00:00Z"}',
            "robot-a",
            "malformed",
            "uptime_s",
        ),
        (
            b'{"schema":"jetfleet.telemetry/v1","device_id":"robot-a","at":"2026-01-01T00:00:00Z",'
            b'"uptime_s":1,"temps":{"cpu":NaN}}',
            "robot-a",
            "malformed",
            "finite number",
        ),
        (None, "robot-b", "topic_mismatch", "robot-a"),  # robot-a's sample on robot-b's topic
        (b"x" * (64 * 1024 + 1), "robot-a", "oversized", "65537 bytes"),
    ],
)
def test_bad_sample_is_dropped_counted_and_logged_and_ingestion_goes_on(
    mosquitto: LocalMosquitto,
    ingester: TelemetryIngester,
    payload: bytes | None,
    topic_device: str,
    reason: str,
    detail: str,
) -> None:
    pub = Publisher(mosquitto, "robot-a")
    try:
        with capture_logs() as logs:
            pub.publish(payload or sample("robot-a").encode(), TOPICS.telemetry(topic_device))
            pub.publish(sample("robot-a", 1).encode())
            assert ingester.wait_stored(1, 10)
    finally:
        pub.close()
    assert ingester.stats.dropped == {reason: 1}
    assert ingester.stats.stored == 1 and ingester.stats.received == 2
    drops = [e for e in logs if e["event"] == "telemetry_dropped"]
    assert len(drops) == 1 and drops[0]["reason"] == reason
    assert detail in drops[0]["detail"] and drops[0]["log_level"] == "warning"


def test_a_flood_of_bad_samples_is_counted_in_full_but_logged_once(
    mosquitto: LocalMosquitto, ingester: TelemetryIngester
) -> None:
    pub = Publisher(mosquitto, "robot-a")
    try:
        with capture_logs() as logs:
            for _ in range(50):
                pub.publish(b"garbage")
            pub.publish(sample("robot-a").encode())
            assert ingester.wait_stored(1, 10)
    finally:
        pub.close()
    assert ingester.stats.dropped["malformed"] == 50
    assert len([e for e in logs if e["event"] == "telemetry_dropped"]) == 1


def test_a_full_queue_drops_with_its_own_reason(mosquitto: LocalMosquitto, tmp_path: Path) -> None:
    ing = TelemetryIngester(tmp_path / "t.db", mosquitto.url, queue_max=0)
    ing.start()
    assert ing.wait_connected(10)
    pub = Publisher(mosquitto, "robot-a")
    try:
        pub.publish(sample("robot-a").encode())
        assert wait_for(lambda: ing.stats.dropped.get("queue_full") == 1)
    finally:
        pub.close()
        ing.stop()
    assert ing.stats.stored == 0


def test_two_ingesters_on_mqtt5_share_the_stream_without_duplicates(
    mosquitto: LocalMosquitto, tmp_path: Path
) -> None:
    a = TelemetryIngester(tmp_path / "a.db", mosquitto.url, idle_wait_s=0.01)
    b = TelemetryIngester(tmp_path / "b.db", mosquitto.url, idle_wait_s=0.01)
    assert a.telemetry_subscription == "$share/jetfleet/jetfleet/v1/devices/+/telemetry"
    a.start()
    b.start()
    pub = Publisher(mosquitto, "robot-a")
    try:
        time.sleep(0.3)
        for i in range(40):
            pub.publish(sample("robot-a", i).encode())
        assert wait_for(lambda: a.stats.stored + b.stats.stored == 40)
        time.sleep(0.3)
    finally:
        pub.close()
        a.stop()
        b.stop()
    assert a.stats.stored + b.stats.stored == 40
    assert a.stats.stored > 0 and b.stats.stored > 0


def test_mqtt311_uses_a_plain_subscription(mosquitto: LocalMosquitto, tmp_path: Path) -> None:
    ing = TelemetryIngester(tmp_path / "t.db", mosquitto.url, protocol="3.1.1")
    assert ing.telemetry_subscription == "jetfleet/v1/devices/+/telemetry"
    ing.start()
    pub = Publisher(mosquitto, "robot-a")
    try:
        pub.publish(sample("robot-a").encode())
        assert ing.wait_stored(1, 10)
    finally:
        pub.close()
        ing.stop()


def test_retained_status_is_tracked(mosquitto: LocalMosquitto, ingester: TelemetryIngester) -> None:
    pub = Publisher(mosquitto, "robot-a")
    try:
        st = DeviceStatus.new(device_id="robot-a", online=False, groups=["canary"])
        pub.client.publish(TOPICS.status("robot-a"), st.encode(), qos=1, retain=True)
        assert wait_for(lambda: "robot-a" in ingester.status)
    finally:
        pub.close()
    assert ingester.status["robot-a"].online is False
    assert ingester.status["robot-a"].groups == ["canary"]


def test_retention_folds_old_samples_into_minute_means_then_deletes_them(db: str) -> None:
    store = TelemetryStore(default_telemetry_db(db))
    now = 1_800_000_000.0  # a minute boundary
    day = 86400
    rows = []
    # 3 samples in one minute two days ago, 2 in the minute 40 days ago, 2 an hour ago.
    for ts, cpu in [
        (now - 2 * day + 5, [10.0]),
        (now - 2 * day + 25, [20.0]),
        (now - 2 * day + 45, [60.0]),
        (now - 40 * day + 1, [5.0]),
        (now - 40 * day + 2, [5.0]),
        (now - 3600 + 1, [70.0]),
        (now - 3600 + 2, [80.0]),
    ]:
        s = sample("robot-a", at=ts, cpu={"percent": cpu})
        rows.append(row_from_sample(s, s.encode().decode()))
    store.insert_batch(rows)
    counts = store.maintain(now)
    if store.conn.postgres:
        # Rows in a day partition (made around today's date: 40 days before `now` may be
        # one) went with it, not row by row: what is left is checked below.
        assert counts["raw_deleted"] <= 5 and counts["minute_deleted"] <= 1
    else:
        assert counts["raw_deleted"] == 5 and counts["minute_deleted"] == 1
    assert store.count_raw("robot-a") == 2  # the last hour stays raw
    minutes = list(store.minute_rows("robot-a", 0))
    assert [(m["ts"], m["n"], m["cpu_pct"]) for m in minutes] == [
        (now - 2 * day, 3, 30.0),
        (now - 3600, 2, 75.0),
    ]
    # series() stitches minute means (before the raw window) to raw samples.
    pts = store.series("robot-a", "cpu_pct", now - 3 * day, now)
    assert pts == [(now - 2 * day, 30.0), (now - 3600 + 1, 70.0), (now - 3600 + 2, 80.0)]
    # A second run changes nothing: downsampling is idempotent.
    store.maintain(now)
    assert len(list(store.minute_rows("robot-a", 0))) == 2
    store.close()


def test_one_maintainer_at_a_time_the_others_skip_and_the_next_round_catches_up(
    db: str,
) -> None:
    """Ingesters on several hosts each run maintenance; two folding the same minutes at
    once deadlocked on telemetry_minute (PostgreSQL aborted one). Now the second skips."""
    if not db.startswith("postgresql"):
        pytest.skip("SQLite's write transaction already admits one maintainer")
    target = default_telemetry_db(db)
    first, second = TelemetryStore(target), TelemetryStore(target)
    now = 1_800_000_000.0
    s = sample("robot-a", at=now - 90, cpu={"percent": [40.0]})
    first.insert_batch([row_from_sample(s, s.encode().decode())])
    with first.conn.transaction(exclusive=False):
        assert first.conn.claim(MAINTAIN_LOCK)  # what a maintainer elsewhere holds
        counts = second.maintain(now)
    assert counts["skipped"] == 1 and counts["minutes"] == 0
    assert list(second.minute_rows("robot-a", 0)) == []
    counts = second.maintain(now)
    assert counts["skipped"] == 0 and counts["minutes"] == 1
    assert [m["cpu_pct"] for m in second.minute_rows("robot-a", 0)] == [40.0]
    first.close()
    second.close()


def test_maintenance_runs_beside_the_writer_and_keeps_raw_samples_as_long_as_told(
    mosquitto: LocalMosquitto, tmp_path: Path
) -> None:
    ing = TelemetryIngester(
        tmp_path / "t.db", mosquitto.url, maintenance_interval_s=0.2, raw_retention_s=3600
    )
    ing.start()
    pub = Publisher(mosquitto, "robot-a")
    try:
        pub.publish(sample("robot-a", at=time.time() - 7200, cpu={"percent": [30.0]}).encode())
        assert ing.wait_stored(1, 10)
        assert wait_for(lambda: ing.stats.maintenance_runs >= 2)
        pub.publish(sample("robot-a", i=1).encode())
        assert ing.wait_stored(2, 10)  # the writer goes on while maintenance runs
    finally:
        pub.close()
        ing.stop()
    store = TelemetryStore(tmp_path / "t.db", readonly=True)
    # The sample of two hours ago is past the hour of raw retention: only its mean stays.
    assert [m["cpu_pct"] for m in store.minute_rows("robot-a", 0)] == [30.0]
    assert store.count_raw("robot-a") == 1
    store.close()


def test_writer_drains_the_queue_on_stop(mosquitto: LocalMosquitto, tmp_path: Path) -> None:
    ing = TelemetryIngester(tmp_path / "t.db", mosquitto.url, idle_wait_s=5.0)
    ing.start()
    pub = Publisher(mosquitto, "robot-a")
    try:
        for i in range(20):
            pub.publish(sample("robot-a", i).encode())
        assert wait_for(lambda: ing.stats.received == 20)
    finally:
        pub.close()
        ing.stop()
    store = TelemetryStore(tmp_path / "t.db", readonly=True)
    assert store.count_raw() == 20
    store.close()


def test_an_ingest_pool_spreads_over_processes_and_sums_its_counters(
    mosquitto: LocalMosquitto, tmp_path: Path
) -> None:
    pool = IngestPool(2, tmp_path / "t.db", mosquitto.url, idle_wait_s=0.01)
    pool.start()
    pub = Publisher(mosquitto, "robot-a")
    try:
        time.sleep(0.3)
        for i in range(60):
            pub.publish(sample("robot-a", i).encode())
        pub.publish(b"garbage")
        assert wait_for(lambda: pool.stats.stored == 60, 20)
        assert wait_for(lambda: pool.stats.dropped.get("malformed") == 1, 5)
        in_worker = pool.stats.stored - pool.main.stats.stored
    finally:
        pub.close()
        pool.stop()
    assert 0 < in_worker < 60  # both processes took a share
    store = TelemetryStore(tmp_path / "t.db", readonly=True)
    assert store.count_raw() == 60  # and nothing twice
    store.close()


def test_an_ingest_pool_stops_even_after_one_of_its_workers_was_killed(
    mosquitto: LocalMosquitto, tmp_path: Path
) -> None:
    pool = IngestPool(2, tmp_path / "t.db", mosquitto.url, idle_wait_s=0.01)
    pool.start()
    os.kill(pool.worker_pids[0], signal.SIGKILL)  # asleep between stats updates
    time.sleep(0.5)
    with capture_logs() as logs:
        stopper = threading.Thread(target=pool.stop, daemon=True)
        stopper.start()
        stopper.join(15)
    assert not stopper.is_alive(), "stop() hung on the killed worker"
    died = [e for e in logs if e["event"] == "ingest_worker_died"]
    assert died and died[0]["exitcode"] == -signal.SIGKILL


def test_several_workers_on_mqtt311_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MQTT 5 shared subscription"):
        IngestPool(2, tmp_path / "t.db", "mqtt://127.0.0.1:1", protocol="3.1.1")


def test_ingestion_resumes_after_the_broker_restarts(
    mosquitto: LocalMosquitto, ingester: TelemetryIngester
) -> None:
    pub = Publisher(mosquitto, "robot-a")
    try:
        pub.publish(sample("robot-a", 0).encode())
        assert ingester.wait_stored(1, 10)
        with capture_logs() as logs:
            mosquitto.stop()
            assert wait_for(lambda: not ingester.wait_connected(0), 10)
            mosquitto.start()
            assert ingester.wait_connected(15), "the ingester did not reconnect"
        assert any(e["event"] == "ingest_disconnected" for e in logs)
        assert wait_for(lambda: pub.client.is_connected(), 15)
        time.sleep(0.2)  # the ingester's SUBSCRIBE follows its CONNACK
        pub.publish(sample("robot-a", 1).encode())
        assert ingester.wait_stored(2, 10)
    finally:
        pub.close()


def test_an_ingester_given_a_clusters_nodes_skips_a_dead_one_and_follows_a_stopped_one(
    tmp_path: Path,
) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    with LocalMosquitto(tmp_path / "one") as one, LocalMosquitto(tmp_path / "two") as two:
        ing = TelemetryIngester(tmp_path / "t.db", f"{dead},{one.url},{two.url}", idle_wait_s=0.01)
        ing.start(connect_timeout=10)
        try:
            pub = Publisher(one, "robot-a")
            pub.publish(sample("robot-a", 0).encode())
            assert ing.wait_stored(1, 10)
            pub.close()
            one.stop()
            # Node one is gone: after one retry on it (it may be back) the list moves on.
            assert wait_for(lambda: not ing.wait_connected(0), 10)
            assert ing.wait_connected(20), "the ingester did not move to node two"
            pub = Publisher(two, "robot-a")
            pub.publish(sample("robot-a", 1).encode())
            assert ing.wait_stored(2, 10)
            pub.close()
        finally:
            ing.stop()
    with pytest.raises(ConnectionError, match=f"cannot connect to {dead},{dead}"):
        TelemetryIngester(tmp_path / "t.db", f"{dead},{dead}").start(connect_timeout=2)


def test_two_writers_of_one_database_naming_the_same_devices_never_deadlock(db: str) -> None:
    """Two ingesters' batches hold the same devices in whatever order the shared
    subscription gave them; their device_latest updates must not lock in opposite orders
    (PostgreSQL would abort one batch with 'deadlock detected')."""
    target = default_telemetry_db(db)
    TelemetryStore(target).close()
    devices = [f"robot-{i:04d}" for i in range(2500)]
    base = float(int(time.time()) - 600)
    rows = [row_from_sample(s := sample(d, at=base), s.encode().decode()) for d in devices]
    barrier, errors = threading.Barrier(2), []

    def write(batch: list[Any]) -> None:
        store = TelemetryStore(target)
        try:
            for _ in range(4):
                barrier.wait(10)
                store.insert_batch(batch)
        except Exception as e:
            errors.append(e)
            barrier.abort()
        finally:
            store.close()

    writers = [threading.Thread(target=write, args=(b,)) for b in (rows, rows[::-1])]
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    assert not errors
    store = TelemetryStore(target, readonly=True)
    assert store.count_raw() == 8 * len(devices)
    assert len(store.latest()) == len(devices)
    store.close()


def test_two_ingesters_write_one_database_every_sample_once(
    mosquitto: LocalMosquitto, db: str
) -> None:
    """Two `serve` ingesters on the MQTT 5 shared subscription, one database (a SQLite
    file, or PostgreSQL's partitioned table): every sample stored once."""
    target = default_telemetry_db(db)
    ingesters = [TelemetryIngester(target, mosquitto.url, idle_wait_s=0.01) for _ in range(2)]
    for ing in ingesters:
        ing.start()
    pub = Publisher(mosquitto, "robot-a")
    base = float(int(time.time()) - 60)
    try:
        time.sleep(0.3)
        for i in range(60):
            pub.publish(sample("robot-a", i, at=base + i).encode())
        assert wait_for(lambda: sum(ing.stats.stored for ing in ingesters) == 60)
    finally:
        pub.close()
        for ing in ingesters:
            ing.stop()
    assert all(ing.stats.stored > 0 for ing in ingesters)
    store = TelemetryStore(target, readonly=True)
    assert store.count_raw("robot-a") == 60
    assert [p[0] for p in store.series("robot-a", "load1", 0, 2e9)] == [base + i for i in range(60)]
    assert store.latest()[0].ts == base + 59
