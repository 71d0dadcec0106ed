"""`jetfleet telemetry export|plot|watch` against a real telemetry database (SQLite and
PostgreSQL) and broker."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import structlog
from typer.testing import CliRunner

from controller.cli.main import app
from controller.cli.telemetry import parse_time
from controller.sandbox.localbroker import LocalMosquitto
from controller.telemetry.store import (
    METRICS,
    TelemetryStore,
    default_telemetry_db,
    row_from_sample,
)
from protocol.messages import DeviceStatus, ModelSlot
from protocol.telemetry import TelemetrySample
from protocol.topics import Topics


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands configure structlog for the process (bound to the stderr of their
    moment); start and end each test with the default configuration."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


runner = CliRunner()


def make_sample(device: str, ts: float, cpu: float) -> TelemetrySample:
    return TelemetrySample.new(
        device_id=device,
        at=datetime.fromtimestamp(ts, timezone.utc),
        uptime_s=ts % 1000,
        cpu={"percent": [cpu]},
        temps={"cpu": 40.0 + cpu / 10},
        gpu={"source": "nvml", "load_pct": cpu, "power_mw": {"board": 70000.0}},
    )


@pytest.fixture
def db(db: str) -> str:
    """The telemetry database of the controller database `db` (SQLite and PostgreSQL),
    with half an hour of one device's samples and one of another's."""
    path = default_telemetry_db(db)
    store = TelemetryStore(path)
    now = time.time()
    rows = []
    for i in range(30):  # one sample a minute for the last half hour
        s = make_sample("robot-a", now - 1800 + i * 60, float(i))
        rows.append(row_from_sample(s, s.encode().decode()))
    s = make_sample("robot-b", now - 10, 99.0)
    rows.append(row_from_sample(s, s.encode().decode()))
    store.insert_batch(rows)
    store.close()
    return str(path)


def invoke(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_export_csv_has_one_row_per_sample_with_named_columns(db: str) -> None:
    code, out, _ = invoke(
        "telemetry", "export", "--device", "robot-a", "--since", "1h", "--telemetry-db", str(db)
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 30
    assert list(rows[0]) == ["time", "ts", "device_id", *METRICS]
    assert rows[0]["device_id"] == "robot-a" and rows[0]["time"].endswith("Z")
    assert [float(r["cpu_pct"]) for r in rows[:3]] == [0.0, 1.0, 2.0]
    assert rows[5]["power_w"] == "70.0"


def test_export_jsonl_hands_back_the_samples_as_sent(db: str, tmp_path: Path) -> None:
    out_file = tmp_path / "a.jsonl"
    code, _, _ = invoke(
        "telemetry",
        "export",
        "--device",
        "robot-a",
        "--since",
        "10m",
        "--format",
        "jsonl",
        "--out",
        str(out_file),
        "--telemetry-db",
        str(db),
    )
    assert code == 0
    lines = out_file.read_text().splitlines()
    assert 9 <= len(lines) <= 11
    samples = [TelemetrySample.decode(ln) for ln in lines]
    assert all(s.device_id == "robot-a" for s in samples)
    assert samples == sorted(samples, key=lambda s: s.at)


def test_export_minute_resolution_after_maintenance(db: str) -> None:
    store = TelemetryStore(db)
    store.maintain()
    store.close()
    code, out, _ = invoke(
        "telemetry",
        "export",
        "--device",
        "robot-a",
        "--since",
        "1h",
        "--resolution",
        "minute",
        "--format",
        "jsonl",
        "--telemetry-db",
        str(db),
    )
    assert code == 0
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert len(rows) >= 29 and all(r["n"] == 1 for r in rows)
    assert rows[0]["time"].endswith(":00Z")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "yesterday"), "neither a duration"),
        (("--device", "Robot A"), "invalid device id"),
    ],
)
def test_export_bad_input_is_exit_2_with_a_reason(
    db: str, args: tuple[str, ...], message: str
) -> None:
    base = {"--device": "robot-a", "--since": "1h"}
    base.update(dict(zip(args[::2], args[1::2], strict=False)))
    flat = [x for kv in base.items() for x in kv]
    code, _, err = invoke("telemetry", "export", *flat, "--telemetry-db", str(db))
    assert code == 2 and message in err


def test_export_without_database_says_where_it_looked(tmp_path: Path) -> None:
    code, _, err = invoke(
        "telemetry", "export", "--device", "robot-a", "--telemetry-db", str(tmp_path / "no.db")
    )
    assert code == 1 and "no telemetry database" in err and "jetfleet serve" in err


def test_plot_writes_a_png(db: str, tmp_path: Path) -> None:
    png = tmp_path / "cpu.png"
    code, _, err = invoke(
        "telemetry",
        "plot",
        "--device",
        "robot-a",
        "--metric",
        "cpu_pct",
        "--out",
        str(png),
        "--since",
        "1h",
        "--telemetry-db",
        str(db),
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "30 points" in err


def test_plot_unknown_metric_lists_the_known_ones(db: str, tmp_path: Path) -> None:
    code, _, err = invoke(
        "telemetry",
        "plot",
        "--device",
        "robot-a",
        "--metric",
        "fan_rpm",
        "--out",
        str(tmp_path / "x.png"),
        "--telemetry-db",
        str(db),
    )
    assert code == 2 and "unknown metric 'fan_rpm'" in err and "gpu_load" in err


def test_parse_time_accepts_durations_and_iso() -> None:
    assert parse_time("90s", now=1000.0) == 910.0
    assert parse_time("2h", now=10_000.0) == 2800.0
    assert (
        parse_time("2026-11-25T07:00:00Z")
        == datetime(2026, 11, 25, 7, tzinfo=timezone.utc).timestamp()
    )
    assert parse_time("2026-11-25T07:00:00") == parse_time("2026-11-25T07:00:00+00:00")


def test_watch_once_shows_status_and_live_samples(
    mosquitto: LocalMosquitto, tmp_path: Path
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    topics = Topics()
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    for dev, groups in (("robot-a", ["canary"]), ("robot-b", ["warehouse-a"])):
        st = DeviceStatus.new(
            device_id=dev,
            online=True,
            groups=groups,
            models={"detector": ModelSlot(active="1.4.0")},
        )
        pub.publish(topics.status(dev), st.encode(), qos=1, retain=True).wait_for_publish(5)
    stop = False

    import threading

    def feed() -> None:
        while not stop:
            s = make_sample("robot-a", time.time(), 42.0)
            pub.publish(topics.telemetry("robot-a"), s.encode(), qos=0)
            time.sleep(0.1)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        code, out, err = invoke(
            "--broker",
            mosquitto.url,
            "--db",
            str(tmp_path / "c.db"),
            "telemetry",
            "watch",
            "--once",
            "--wait",
            "1.5",
            "--group",
            "canary",
            "--output",
            "json",
        )
    finally:
        stop = True
        t.join()
        pub.disconnect()
        pub.loop_stop()
    assert code == 0, err
    rows = json.loads(out)
    assert [r["device"] for r in rows] == ["robot-a"]  # robot-b is not in the canary group
    r = rows[0]
    assert r["online"] is True and r["versions"] == {"detector": "1.4.0"}
    assert r["gpu_load_pct"] == 42.0 and r["power_w"] == 70.0 and r["temp_max_c"] == 44.2
    assert r["age_s"] is not None and r["age_s"] < 5


def test_export_of_a_device_that_never_sent_telemetry_is_an_error(db: str, tmp_path: Path) -> None:
    out = tmp_path / "robot-z.csv"
    code, stdout, err = invoke(
        "telemetry", "export", "--device", "robot-z", "--out", str(out),
        "--telemetry-db", str(db),
    )  # fmt: skip
    assert code == 2, err
    assert "no telemetry was ever received from 'robot-z'" in err
    assert "devices with telemetry: robot-a, robot-b" in err
    assert stdout == "" and not out.exists()


def test_plot_shows_offline_gaps_version_changes_and_latency_per_version(
    tmp_path: Path,
) -> None:
    path = tmp_path / "telemetry.db"
    store = TelemetryStore(path)
    now = time.time()
    rows = []
    for i in range(40):  # a sample a minute, with 20 minutes offline after the 20th
        ts = now - 3600 + (i if i < 20 else i + 20) * 60
        version = "1.0.0" if i < 25 else "2.0.0"
        s = TelemetrySample.new(
            device_id="robot-c",
            at=datetime.fromtimestamp(ts, timezone.utc),
            uptime_s=ts % 1000,
            cpu={"percent": [10.0]},
            mem={"total": 8 * 2**30, "used": 3 * 2**30, "available": 5 * 2**30},
            models={"detector": {"version": version, "p50_ms": 2.0, "p99_ms": 5.0}},
        )
        rows.append(row_from_sample(s, s.encode().decode()))
    store.insert_batch(rows)
    store.close()

    def plot(metric: str) -> tuple[int, str]:
        png = tmp_path / f"{metric}.png"
        code, _, err = invoke(
            "telemetry", "plot", "--device", "robot-c", "--metric", metric, "--out", str(png),
            "--since", "2h", "--telemetry-db", str(path),
        )  # fmt: skip
        assert code == 0, err
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return code, err

    _, err = plot("cpu_pct")
    hm = [f"{datetime.fromtimestamp(now - 3600 + m * 60, timezone.utc):%H:%M}" for m in (19, 40)]
    assert f"offline {hm[0]}-{hm[1]}" in err
    changed = f"{datetime.fromtimestamp(now - 3600 + 45 * 60, timezone.utc):%H:%M}"
    assert f"detector 1.0.0 -> 2.0.0 at {changed}" in err
    _, err = plot("latency")
    assert "80 points of latency" in err  # p50 and p99 of 40 samples, per version
    plot("mem_used")
