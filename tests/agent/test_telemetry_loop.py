"""The telemetry thread keeps its rhythm and survives failing samplers and publishers."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.telemetry.loop import TelemetryLoop
from agent.telemetry.sampler import TelemetrySampler
from protocol.telemetry import TelemetrySample


def make_sampler(tmp_path: Path, view: Any = None) -> TelemetrySampler:
    return TelemetrySampler(
        tmp_path, view or (lambda: {"device_id": "robot-1"}), gpu="none", sysfs_root=tmp_path
    )


def wait_until(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_loop_publishes_real_samples_at_its_interval(tmp_path: Path) -> None:
    got: list[bytes] = []
    loop = TelemetryLoop(make_sampler(tmp_path), got.append, interval_s=0.05)
    loop.start()
    assert wait_until(lambda: len(got) >= 5)
    loop.stop()
    n = len(got)
    time.sleep(0.15)
    assert len(got) == n, "published after stop()"
    samples = [TelemetrySample.decode(p) for p in got]
    assert all(s.device_id == "robot-1" for s in samples)
    assert samples[0].at < samples[-1].at
    assert not loop.running and loop.errors == 0


def test_sampler_and_publisher_failures_are_counted_logged_and_survived(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = {"view": 0, "publish": 0}

    def flaky_view() -> dict[str, Any]:
        calls["view"] += 1
        if calls["view"] in (2, 3):
            raise RuntimeError("LiveStats socket vanished")
        return {"device_id": "robot-1"}

    got: list[bytes] = []

    def flaky_publish(payload: bytes) -> None:
        calls["publish"] += 1
        if calls["publish"] == 2:
            raise ConnectionError("broker gone")
        got.append(payload)

    loop = TelemetryLoop(make_sampler(tmp_path, flaky_view), flaky_publish, interval_s=0.02)
    loop.start()
    assert wait_until(lambda: len(got) >= 4)
    loop.stop()
    assert loop.errors == 3 and loop.published == len(got)
    out = capsys.readouterr().out
    assert "telemetry_sample_failed" in out
    assert "LiveStats socket vanished" in out and "broker gone" in out
    # the same reason twice in a row is logged once
    assert out.count("LiveStats socket vanished") == 1


def test_a_slow_sample_does_not_stack_up_ticks(tmp_path: Path) -> None:
    stamps: list[float] = []
    gate = threading.Event()

    def slow_view() -> dict[str, Any]:
        if not gate.is_set():
            gate.set()
            time.sleep(0.3)  # six intervals long
        return {"device_id": "robot-1"}

    loop = TelemetryLoop(
        make_sampler(tmp_path, slow_view), lambda _: stamps.append(time.monotonic()), 0.05
    )
    loop.start()
    assert wait_until(lambda: len(stamps) >= 4)
    loop.stop()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(g > 0.03 for g in gaps), f"burst after a stall: {gaps}"


def test_a_non_positive_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        TelemetryLoop(make_sampler(tmp_path), lambda _: None, 0)
