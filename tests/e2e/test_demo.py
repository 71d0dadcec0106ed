"""`jetfleet demo` end to end: real broker, three real agents, real CLI commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
JETFLEET = [sys.executable, "-c", "from controller.cli.main import app; app()"]


def processes_using(workdir: Path, but: int | None = None) -> list[str]:
    """Command lines of live processes that mention the demo's directory (agents, broker)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(workdir) in cmdline and p.pid not in (os.getpid(), but):
            found.append(f"{p.pid}: {cmdline}")
    return found


@pytest.mark.serial  # asserts the demo's wall-clock time and a speed verdict
@pytest.mark.slow
def test_the_demo_rolls_back_the_slower_version_and_the_fleet_stays_on_the_first(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    started = time.monotonic()
    done = subprocess.run(
        [*JETFLEET, "demo", "--workdir", str(workdir), "--keep", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout)
    assert outcome["ok"] is True

    first = outcome["first_rollout"]
    assert (first["version"], first["state"]) == ("1.0.0", "succeeded")
    # robot-03 was off: left to the group's release, which the rollout set, and it caught
    # up when it came back.
    assert first["devices"] == {"robot-01": "SUCCEEDED", "robot-02": "SUCCEEDED",
                                "robot-03": "CANCELED"}  # fmt: skip
    assert first["codes"] == {"robot-03": "offline"}
    assert outcome["caught_up"]["device"] == "robot-03"
    assert outcome["caught_up"]["version"] == "1.0.0"
    assert "robot-03 comes back" in done.stderr

    second = outcome["second_rollout"]
    assert (second["version"], second["state"]) == ("1.1.0", "aborted")
    # Only the canary ever got 1.1.0: its own gate measured the regression and rolled back.
    assert second["rolled_back"] == ["robot-01"]
    assert second["codes"] == {"robot-01": "latency_regression"}
    assert "slower than the active engine" in second["reasons"]["robot-01"]
    assert second["devices"]["robot-02"] not in ("SUCCEEDED", "ROLLED_BACK")
    speed = second["gate"]["robot-01"]["speed"]
    assert speed["candidate"]["p50_ms"] > speed["active"]["p50_ms"]

    assert outcome["fleet"] == {"robot-01": "1.0.0", "robot-02": "1.0.0", "robot-03": "1.0.0"}
    assert set(outcome["telemetry"]) == {"robot-01", "robot-02", "robot-03"}
    assert outcome["telemetry"]["robot-01"]["models"]["detector"]["version"] == "1.0.0"

    assert processes_using(workdir) == []
    assert elapsed < 120, f"the demo took {elapsed:.0f}s"
    # The story is told on stderr in JSON mode: the commands an operator would type.
    assert "$ jetfleet rollout start detector-1.1.0.jfb" in done.stderr


@pytest.mark.slow
def test_ctrl_c_during_the_demo_stops_every_agent_and_the_broker(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*JETFLEET, "demo", "--workdir", str(workdir), "--output", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        logs = [workdir / "agents" / d / "agent.log" for d in ("robot-01", "robot-02", "robot-03")]
        deadline = time.monotonic() + 60
        while not all(p.exists() for p in logs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(p.exists() for p in logs), "the agents never started"
        running = processes_using(workdir, but=proc.pid)
        assert sum("agent.cli" in c for c in running) == 3, running
        assert sum("mosquitto" in c for c in running) == 1, running
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err.decode()[-2000:]
        assert b"interrupted: agents and broker stopped" in err
        assert processes_using(workdir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
