"""The robot service's own metrics: recorded with ModelRuntime.count()/gauge() in the
service's process, aggregated by the agent's LiveStats, reported in telemetry per model
version; and what a hostile or buggy service cannot do to the agent."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.engines import EngineError
from agent.livestats import LiveStats, encode_ack
from agent.metrics import (
    COUNTER,
    GAUGE,
    MAX_METRICS_PER_DATAGRAM,
    MetricsError,
    decode_metrics,
    encode_metrics,
)
from agent.runtime import ModelRuntime
from controller.telemetry.ingest import TelemetryIngester
from protocol.telemetry import ModelStats, TelemetrySample
from tests.agent.harness import AgentProcess, TelemetryTap, write_agent_config
from tests.agent.test_runtime import FEEDS, Device

REPO = Path(__file__).resolve().parents[2]
DEV = "robot-metrics"
# The robot's own inference service: a separate Python process using the runtime library.
SERVICE = """
import sys
from agent.runtime import ModelRuntime
from tests.models import mlp_inputs

feeds = mlp_inputs(batch=4)
with ModelRuntime("det", sys.argv[1], report_interval_s=0.1) as rt:
    for i in range(50):
        rt.infer(feeds)
        rt.count("detections", 3)
        rt.gauge("confidence", i / 100)
    for _ in range(2):
        try:
            rt.infer({"wrong": feeds["x"]})
        except Exception:
            pass
"""


@pytest.fixture
def device(tmp_path: Path) -> Device:
    """A model installed and active the way the agent lays it out."""
    d = Device(tmp_path / "data")
    d.install("1.0.0", seed=1)
    d.install("2.0.0", seed=2)
    d.activate("1.0.0")
    return d


def _counter(total: float, n: int = 1) -> list[Any]:
    return [COUNTER, n, total, 0.0, 0.0, 0.0]


def _gauge(last: float, total: float, lo: float, hi: float, n: int) -> list[Any]:
    return [GAUGE, n, last, total, lo, hi]


def _wait(pred: Any, what: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
    return got


@pytest.fixture
def stats(tmp_path: Path) -> Any:
    s = LiveStats(tmp_path / "run" / "live.sock", max_metric_names=4)
    s.start()
    yield s
    s.stop()


def _send(stats: LiveStats, *datagrams: bytes) -> None:
    """Send, then wait until the server took them all: a unix datagram socket keeps
    order, so a sentinel acknowledgement seen means every datagram before it was read."""
    stats.clear_ack("sentinel")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, str(stats.socket_path))
        s.sendto(encode_ack("sentinel", "1"), str(stats.socket_path))
    _wait(lambda: stats.ack("sentinel"), "the datagrams were never read")


def test_a_report_round_trips_and_malformed_ones_are_refused() -> None:
    good = encode_metrics("det", "1.0.0", [("fallbacks", _counter(2.0, 2))], errors=1)
    r = decode_metrics(good)
    assert (r.model, r.version, r.errors, r.entries) == ("det", "1.0.0", 1, [
        ("fallbacks", _counter(2.0, 2))])  # fmt: skip
    too_many = [(f"m{i}", _counter(1.0)) for i in range(MAX_METRICS_PER_DATAGRAM + 1)]
    for bad in (
        good[:-3],  # truncated
        good + b"x",  # trailing bytes
        encode_metrics("det", "1.0.0", [("bad name!", _counter(1.0))]),
        encode_metrics("det", "1.0.0", [("x" * 65, _counter(1.0))]),
        encode_metrics("det", "1.0.0", [("nan", _counter(float("nan")))]),
        encode_metrics("det", "1.0.0", [("inf", _gauge(1.0, float("inf"), 0.0, 1.0, 1))]),
        encode_metrics("det", "1.0.0", too_many),
        encode_metrics("", "1.0.0", []),
        encode_metrics("det", "../1", []),
        encode_metrics("det", "1.0.0", [("k", [7, 1, 1.0, 0.0, 0.0, 0.0])]),  # unknown kind
    ):
        with pytest.raises(MetricsError):
            decode_metrics(bad)


def test_reports_are_merged_per_version_and_taken_once(stats: LiveStats) -> None:
    _send(stats,
          encode_metrics("det", "1.0.0", [("detections", _counter(5.0, 2)),
                                          ("confidence", _gauge(0.5, 1.2, 0.5, 0.7, 2))]),
          encode_metrics("det", "1.0.0", [("detections", _counter(3.0, 1)),
                                          ("confidence", _gauge(0.9, 0.9, 0.9, 0.9, 1))],
                         errors=2),
          encode_metrics("det", "2.0.0", [("detections", _counter(1.0, 1))]))  # fmt: skip
    got = stats.take_metrics("det")
    assert got["1.0.0"]["metrics"] == {
        "detections": {"kind": "counter", "n": 3, "sum": 8.0},
        "confidence": {"kind": "gauge", "n": 3, "last": 0.9, "mean": pytest.approx(0.7),
                       "min": 0.5, "max": 0.9},
    }  # fmt: skip
    assert got["1.0.0"]["errors"] == 2 and got["2.0.0"]["metrics"]["detections"]["sum"] == 1.0
    assert stats.take_metrics("det") == {}  # per interval: taken once


def test_distinct_names_are_bounded_per_version_and_the_drop_is_reported(
    stats: LiveStats,
) -> None:
    # A buggy service that puts a frame id into the metric name: 10,000 distinct names.
    flood = [(f"frame_{i}", _counter(1.0)) for i in range(10_000)]
    _send(stats, *(encode_metrics("det", "1.0.0", flood[i : i + 64])
                   for i in range(0, len(flood), 64)))  # fmt: skip
    got = stats.take_metrics("det")["1.0.0"]
    assert len(got["metrics"]) == 4  # max_metric_names
    assert got["dropped"] == 10_000 - 4
    # Versions per model and models are bounded too; past them a report is refused whole.
    before = stats.dropped
    _send(stats, *(encode_metrics("det", f"9.0.{i}", [("x", _counter(1.0))]) for i in range(10)))
    assert len(stats.take_metrics("det")) == 4
    _send(stats, *(encode_metrics(f"m{i}", "1.0.0", [("x", _counter(1.0))]) for i in range(40)))
    assert len(stats.metric_models()) == 8
    assert stats.dropped == before + 6 + 32


def test_hostile_datagrams_are_counted_and_the_server_keeps_going(stats: LiveStats) -> None:
    before = stats.dropped
    good = encode_metrics("det", "1.0.0", [("ok", _counter(1.0))])
    _send(stats, b"JFM1", b"JFM1" + b"\xff" * 60_000, good[:-1], b"JFM1\x00\x00",
          good.replace(b"ok", b"\xff\xfe"), b"\x00" * 8)  # fmt: skip
    assert stats.dropped == before + 6
    _send(stats, good)
    assert stats.take_metrics("det")["1.0.0"]["metrics"]["ok"]["sum"] == 1.0


def test_the_worst_a_service_can_report_still_fits_the_ingesters_sample_limit(
    tmp_path: Path,
) -> None:
    """Every bound filled with the longest names and widest numbers: the sample must stay
    under the controller's 64 KiB (controller/telemetry/ingest.py MAX_SAMPLE_BYTES)."""
    with LiveStats(tmp_path / "live.sock") as live:
        for m in range(20):
            model = f"{m:02d}".ljust(64, "m")
            for v in range(6):
                version = f"{v}.0.0-".ljust(128, "v")
                names = [(f"{i:03d}".ljust(64, "n"), _gauge(-1.2345678901234567e300, 1e300,
                          -1.2345678901234567e300, 1.2345678901234567e300, 2**31))
                         for i in range(70)]  # fmt: skip
                _send(live, *(encode_metrics(model, version, names[i : i + 64])
                              for i in (0, 64)))  # fmt: skip
        models = {m: {"metrics": live.take_metrics(m)} for m in live.metric_models()}
    sample = TelemetrySample.new(device_id=DEV, at=datetime.now(timezone.utc), uptime_s=1.0,
                                 cpu={"percent": [100.0] * 16}, models=models)  # fmt: skip
    names = sum(len(v["metrics"]) for m in models.values() for v in m["metrics"].values())
    assert names == 192
    assert len(sample.encode()) < 60 * 1024  # room left for the machine's own figures


def test_a_service_records_metrics_tagged_with_the_version_serving(device: Device) -> None:
    with (
        LiveStats(device.root / "run" / "live.sock") as live,
        ModelRuntime("det", device.root, report_interval_s=0.05) as rt,
    ):
        for i in range(10):
            rt.infer(FEEDS)
            rt.count("detections", 3)
            rt.gauge("confidence", i / 10)
        with pytest.raises(EngineError):
            rt.infer({"nope": FEEDS["x"]})
        device.activate("2.0.0")
        assert rt.refresh(wait=True)
        rt.count("fallbacks")
        rt.flush_reports()
        _send(live)  # everything the runtime sent is read
        got = live.take_metrics("det")
    v1, v2 = got["1.0.0"], got["2.0.0"]
    assert v1["metrics"]["detections"] == {"kind": "counter", "n": 10, "sum": 30.0}
    assert v1["metrics"]["confidence"] == {"kind": "gauge", "n": 10, "last": 0.9,
                                           "mean": pytest.approx(0.45), "min": 0.0,
                                           "max": 0.9}  # fmt: skip
    assert v1["errors"] == 1
    assert v2["metrics"] == {"fallbacks": {"kind": "counter", "n": 1, "sum": 1.0}}


def test_a_runaway_name_generator_in_the_service_is_bounded_there_too(device: Device) -> None:
    with (
        LiveStats(device.root / "run" / "live.sock") as live,
        ModelRuntime("det", device.root, max_metric_names=8, report_interval_s=60) as rt,
    ):
        for i in range(5000):
            rt.count(f"frame_{i}")
        rt.flush_reports()
        rt.count("not a valid name")
        rt.flush_reports()
        _send(live)
        got = live.take_metrics("det")
    assert len(got["1.0.0"]["metrics"]) == 8
    assert got["1.0.0"]["dropped"] == 5000 + 1 - 8


def _sum(samples: list[TelemetrySample], model: str, version: str, metric: str) -> float:
    total = 0.0
    for s in list(samples):
        m = s.models.get(model)
        v = m.metrics.get(version) if m else None
        if v is not None and metric in v.metrics:
            total += v.metrics[metric].sum or 0.0
    return total


@pytest.mark.slow
@pytest.mark.serial  # under load the neighbour's samples can land after the wait
def test_metrics_of_a_service_process_arrive_in_telemetry_and_in_the_controllers_export(
    tmp_path: Path, device: Device, mosquitto, trust_material
) -> None:
    data = device.root
    cfg = write_agent_config(tmp_path / "agent.toml", device_id=DEV, broker_url=mosquitto.url,
                             data_dir=data, trust_root=trust_material.write(tmp_path / "t.json"),
                             telemetry_interval_s=0.5)  # fmt: skip
    ingester = TelemetryIngester(tmp_path / "telemetry.db", mosquitto.url, idle_wait_s=0.01)
    ingester.start()
    tap = TelemetryTap(mosquitto.url, DEV)
    try:
        with AgentProcess(cfg) as agent:
            sock = data / "run" / "live.sock"
            _wait(sock.exists, "the agent's live socket never appeared", timeout=30)
            _hostile_neighbour(sock)
            subprocess.run([sys.executable, "-c", SERVICE, str(data)], cwd=REPO, check=True,
                           timeout=120)  # fmt: skip
            _wait(lambda: _sum(tap.samples, "det", "1.0.0", "detections") >= 150,
                  "the service's counters never reached telemetry", timeout=30)  # fmt: skip
            assert agent.alive, agent.log()[-2000:]
            samples = list(tap.samples)
    finally:
        tap.close()
        ingester.stop()
    assert _sum(samples, "det", "1.0.0", "detections") == 150.0
    det = [s.models["det"].metrics["1.0.0"] for s in samples
           if "1.0.0" in s.models.get("det", ModelStats()).metrics]  # fmt: skip
    assert sum(v.errors for v in det) == 2
    gauges = [v.metrics["confidence"] for v in det if "confidence" in v.metrics]
    assert min(g.min for g in gauges if g.min is not None) == 0.0
    assert max(g.max for g in gauges if g.max is not None) == 0.49
    evil = [s.models["evil"].metrics["6.6.6"] for s in samples if "evil" in s.models]
    assert max(len(v.metrics) for v in evil) <= 64 and sum(v.dropped for v in evil) > 0
    exported = _export(tmp_path / "telemetry.db")
    stored = [TelemetrySample.decode(line) for line in exported.splitlines() if line.strip()]
    assert _sum(stored, "det", "1.0.0", "detections") == 150.0


def _export(db: Path) -> str:
    """`jetfleet telemetry export --format jsonl` (the controller's CLI: Python 3.11+)."""
    if sys.version_info < (3, 11):
        pytest.skip("the controller's CLI needs Python 3.11 (tomllib)")
    from typer.testing import CliRunner

    from controller.cli.main import app

    try:
        r = CliRunner().invoke(app, ["telemetry", "export", "--device", DEV, "--format",
                                     "jsonl", "--telemetry-db", str(db)])  # fmt: skip
    finally:
        structlog.reset_defaults()  # the CLI configures logging for the whole process
    assert r.exit_code == 0, r.output
    return r.stdout


def _hostile_neighbour(sock: Path) -> None:
    """Garbage, oversize datagrams and a runaway name generator, before the real service."""
    flood = [(f"frame_{i}", _counter(1.0)) for i in range(2000)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for d in (b"JFM1", b"JFM1" + b"\xff" * 60_000, b"\x00" * 9,
                  *(encode_metrics("evil", "6.6.6", flood[i : i + 64])
                    for i in range(0, len(flood), 64))):  # fmt: skip
            s.sendto(d, str(sock))


def test_recording_with_no_agent_listening_or_reports_off_never_fails(device: Device) -> None:
    with ModelRuntime("det", device.root, report=False) as rt:
        rt.count("detections", 2)
        rt.gauge("confidence", 0.5)
        rt.flush_reports()
    with ModelRuntime("det", device.root, report_interval_s=0.01) as rt:  # no LiveStats
        for i in range(200):
            rt.count("detections")
            rt.gauge("confidence", i)
        rt.flush_reports()
        assert rt.infer(FEEDS)["y"].shape[0] == 4


def test_a_counter_fed_an_array_is_dropped_not_fatal(device: Device) -> None:
    with (
        LiveStats(device.root / "run" / "live.sock") as live,
        ModelRuntime("det", device.root, report_interval_s=60) as rt,
    ):
        rt.count("boxes", 1)
        rt.count("boxes", FEEDS["x"][0])  # a bug in the service: an array, not a number
        rt.count("frames")
        rt.flush_reports()
        _send(live)
        got = live.take_metrics("det")["1.0.0"]
    assert got["metrics"] == {"frames": {"kind": "counter", "n": 1, "sum": 1.0}}
    assert got["dropped"] == 2
