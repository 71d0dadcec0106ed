"""LiveStats: a real unix datagram socket, bounded windows, bad input never stops it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.livestats import (
    Ack,
    LiveStats,
    LiveStatsError,
    decode_ack,
    decode_report,
    encode_ack,
    encode_report,
)


@pytest.fixture
def stats(tmp_path: Path) -> Iterator[LiveStats]:
    s = LiveStats(tmp_path / "run" / "live.sock", window=256, max_models=3)
    s.start()
    yield s
    s.stop()


def _send(path: Path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
        c.sendto(data, str(path))


def _wait_count(stats: LiveStats, model: str, n: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = stats.snapshot(model)
        if w is not None and w.count >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{model}: expected {n} samples, have {stats.snapshot(model)}")


def test_report_round_trips_and_garbage_is_refused() -> None:
    data = encode_report("det", "1.2.0", [1.5, 2.5])
    model, version, lat = decode_report(data)
    assert (model, version, lat.tolist()) == ("det", "1.2.0", [1.5, 2.5])
    for bad in (b"", b"XXXX", data[:-1], data + b"\0", encode_report("d", "v", [float("nan")])):
        with pytest.raises(LiveStatsError):
            decode_report(bad)


def test_percentiles_of_sent_latencies(stats: LiveStats) -> None:
    lat = list(np.linspace(1.0, 100.0, 100))
    for i in range(0, 100, 25):
        _send(stats.socket_path, encode_report("det", "1.0.0", lat[i : i + 25]))
    _wait_count(stats, "det", 100)
    w = stats.snapshot("det")
    assert w is not None and w.count == 100 and w.version == "1.0.0"
    assert w.p50_ms == pytest.approx(np.percentile(lat, 50), rel=1e-4)
    assert w.p99_ms == pytest.approx(np.percentile(lat, 99), rel=1e-4)


def test_garbage_datagrams_are_counted_and_the_server_keeps_going(stats: LiveStats) -> None:
    for junk in (b"", b"\xff" * 10, b"JFL1\x05ab", b"JFL1" + b"\x00" * 3000):
        _send(stats.socket_path, junk)
    _send(stats.socket_path, encode_report("det", "1.0.0", [3.0]))
    _wait_count(stats, "det", 1)
    assert stats.dropped >= 3


def test_memory_is_bounded_per_model_and_in_models(stats: LiveStats) -> None:
    for _ in range(10):
        stats.ingest(encode_report("det", "1.0.0", [5.0] * 500))
    w = stats.snapshot("det")
    assert w is not None and w.count == 5000 and w.window == 256
    for m in ("a", "b", "c", "d"):
        stats.ingest(encode_report(m, "1.0.0", [1.0]))
    assert stats.models() == ["a", "b", "det"]  # max_models=3: "c" and "d" were refused


def test_reset_for_a_version_ignores_stragglers_of_the_old_one(stats: LiveStats) -> None:
    stats.ingest(encode_report("det", "1.0.0", [50.0] * 10))
    stats.reset("det", version="2.0.0")
    assert stats.snapshot("det") is None
    stats.ingest(encode_report("det", "1.0.0", [500.0] * 10))  # in flight during the swap
    stats.ingest(encode_report("det", "2.0.0", [4.0] * 10))
    w = stats.snapshot("det")
    assert w is not None and w.count == 10 and w.p99_ms == pytest.approx(4.0)


def test_a_stale_socket_file_does_not_stop_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    first = LiveStats(path)
    first.start()
    # Simulate a crash: the socket file stays behind.
    first._sock.close()  # type: ignore[union-attr]  # noqa: SLF001
    first._stop.set()  # noqa: SLF001
    assert path.exists()
    with LiveStats(path) as second:
        _send(path, encode_report("det", "1", [1.0]))
        _wait_count(second, "det", 1)
    assert not path.exists()


def test_acknowledgements_round_trip_and_a_report_counts_as_one(stats: LiveStats) -> None:
    data = encode_ack("det", "1.1.0", False, "plan does not deserialize")
    assert decode_ack(data) == Ack("det", "1.1.0", False, "plan does not deserialize", "socket")
    for bad in (data[:-1], data + b"\0", b"JFA1\x00\x00\x01\x00", b"JFA1\x01d\x01v\x07\x00"):
        with pytest.raises(LiveStatsError):
            decode_ack(bad)
    _send(stats.socket_path, data)
    _wait_ack(stats, "det", "1.1.0")
    assert stats.ack("det") == Ack("det", "1.1.0", False, "plan does not deserialize", "socket")
    # Latencies of the version a consumer has reported on do not hide its word...
    _send(stats.socket_path, encode_report("det", "1.1.0", [1.0]))
    _wait_count(stats, "det", 1)
    assert stats.ack("det") is not None and stats.ack("det").healthy is False
    # ...but inferences on another version prove that one loaded.
    stats.clear_ack("det")
    assert stats.ack("det") is None
    _send(stats.socket_path, encode_report("det", "1.2.0", [1.0]))
    _wait_ack(stats, "det", "1.2.0")
    assert stats.ack("det") == Ack("det", "1.2.0", True, "serving", "report")


def _wait_ack(stats: LiveStats, model: str, version: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (a := stats.ack(model)) is None or a.version != version:
        assert time.monotonic() < deadline, f"no ack of {version}: {a}"
        time.sleep(0.01)
