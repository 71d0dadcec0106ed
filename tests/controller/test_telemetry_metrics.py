"""The Prometheus endpoint: real samples in the telemetry database, text that
prometheus_client's own parser reads back, labelled per device, model, sensor, rail."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import structlog
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.db import open_database
from controller.telemetry.ingest import IngestStats
from controller.telemetry.metrics import FleetCollector, make_registry
from controller.telemetry.store import TelemetryStore, default_telemetry_db, row_from_sample
from protocol.messages import DeviceStatus
from protocol.telemetry import TelemetrySample


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands configure structlog for the process (bound to the stderr of their
    moment); start and end each test with the default configuration."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


NOW = 1_800_000_000.0


def store_samples(db: str | Path) -> None:
    store = TelemetryStore(db)
    rows = []
    for device, gpu in (
        (
            "robot-a",
            {
                "source": "tegrastats",
                "load_pct": 84.0,
                "freq_mhz": 713.0,
                "power_mw": {"VDD_IN": 17946.0, "VDD_SOC": 3923.0},
                "temp_c": 63.5,
            },
        ),
        ("robot-b", None),
    ):
        s = TelemetrySample.new(
            device_id=device,
            at=datetime.fromtimestamp(NOW - 2, timezone.utc),
            uptime_s=600,
            cpu={"percent": [50.0, 30.0]},
            mem={"total": 8_000, "used": 3_000, "available": 5_000},
            disk_free_bytes=123_456,
            temps={"cpu": 65.5, "tj": 66.0},
            gpu=gpu,
            models={"detector": {"version": "1.4.0", "p50_ms": 3.0, "p99_ms": 8.0, "count": 512}},
            jobs={"done": 4, "failed": 1},
        )
        rows.append(row_from_sample(s, s.encode().decode()))
    store.insert_batch(rows, received=NOW - 1)
    store.close()


def families(collector: FleetCollector) -> dict[str, object]:
    text = generate_latest(make_registry(collector)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples_of(fams: dict, name: str) -> list:
    return list(fams[name].samples)


def test_metrics_text_parses_and_carries_per_device_labels(db: str) -> None:
    db = default_telemetry_db(db)  # SQLite, then PostgreSQL
    store_samples(db)
    stats = IngestStats(received=12, stored=10)
    stats.dropped["malformed"] = 2
    status = {
        "robot-a": DeviceStatus.new(device_id="robot-a", online=True, groups=["warehouse-a"]),
        "robot-c": DeviceStatus.new(device_id="robot-c", online=False, groups=["canary"]),
    }
    fams = families(
        FleetCollector(db, stats=lambda: stats, status=lambda: status, clock=lambda: NOW)
    )

    online = {
        s.labels["device"]: (s.labels["group"], s.value)
        for s in samples_of(fams, "jetfleet_device_online")
    }
    # robot-b has no retained status: online because its samples are fresh.
    assert online == {
        "robot-a": ("warehouse-a", 1.0),
        "robot-b": ("", 1.0),
        "robot-c": ("canary", 0.0),
    }
    gpu = {s.labels["device"]: s.value for s in samples_of(fams, "jetfleet_device_gpu_load_ratio")}
    assert gpu == {"robot-a": 0.84}  # robot-b reports gpu: null
    temps = {
        (s.labels["device"], s.labels["sensor"]): s.value
        for s in samples_of(fams, "jetfleet_device_temperature_celsius")
    }
    assert temps[("robot-a", "gpu")] == 63.5 and temps[("robot-b", "tj")] == 66.0
    power = {s.labels["rail"]: s.value for s in samples_of(fams, "jetfleet_device_power_watts")}
    assert power == {"VDD_IN": 17.946, "VDD_SOC": 3.923}
    lat = {
        (s.labels["device"], s.labels["model"], s.labels["version"], s.labels["quantile"]): s.value
        for s in samples_of(fams, "jetfleet_model_latency_seconds")
    }
    assert lat[("robot-a", "detector", "1.4.0", "0.99")] == 0.008
    assert lat[("robot-b", "detector", "1.4.0", "0.5")] == 0.003
    cpu = {
        s.labels["device"]: s.value
        for s in samples_of(fams, "jetfleet_device_cpu_utilization_ratio")
    }
    assert cpu["robot-a"] == 0.4
    assert fams["jetfleet_telemetry_samples"].type == "counter"
    assert samples_of(fams, "jetfleet_telemetry_samples")[0].value == 10
    dropped = {s.labels["reason"]: s.value for s in samples_of(fams, "jetfleet_telemetry_dropped")}
    assert dropped["malformed"] == 2 and dropped["oversized"] == 0


def test_a_silent_device_without_status_goes_offline(tmp_path: Path) -> None:
    db = tmp_path / "telemetry.db"
    store_samples(db)
    fams = families(FleetCollector(db, clock=lambda: NOW + 3600))
    assert {s.value for s in samples_of(fams, "jetfleet_device_online")} == {0.0}


def test_rollouts_are_counted_by_state_from_the_controller_db(db: str) -> None:
    ctl = db  # SQLite, then PostgreSQL
    db = default_telemetry_db(ctl)
    store_samples(db)
    conn = open_database(ctl)
    # The tables of a release from before versioned schemas: the gauges read those too.
    conn.execute("CREATE TABLE rollouts (id TEXT PRIMARY KEY, kind TEXT, state TEXT)")
    conn.executemany(
        "INSERT INTO rollouts VALUES (?, 'deploy', ?)",
        [("r1", "succeeded"), ("r2", "succeeded"), ("r3", "running")],
    )
    conn.execute("CREATE TABLE assignments (rollout_id TEXT, device_id TEXT, state TEXT)")
    conn.executemany(
        "INSERT INTO assignments VALUES ('r3', ?, ?)",
        [("robot-a", "SUCCEEDED"), ("robot-b", "DOWNLOADING")],
    )
    conn.close()
    fams = families(FleetCollector(db, controller_db=ctl, clock=lambda: NOW))
    by_state = {s.labels["state"]: s.value for s in samples_of(fams, "jetfleet_rollouts")}
    assert by_state == {"succeeded": 2.0, "running": 1.0}
    jobs = {s.labels["state"]: s.value for s in samples_of(fams, "jetfleet_rollout_devices")}
    assert jobs == {"SUCCEEDED": 1.0, "DOWNLOADING": 1.0}
    # Read-only: the collector never created or changed anything there.
    again = open_database(ctl)
    assert again.execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] == 3


def test_a_scrape_without_database_still_answers(tmp_path: Path) -> None:
    fams = families(
        FleetCollector(tmp_path / "missing.db", controller_db=tmp_path / "nope.db", clock=time.time)
    )
    assert samples_of(fams, "jetfleet_device_online") == []
    assert "jetfleet_rollouts" not in fams
