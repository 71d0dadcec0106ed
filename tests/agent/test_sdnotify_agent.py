"""The running agent talks to systemd: READY, STATUS, WATCHDOG and STOPPING arrive on a
real NOTIFY_SOCKET datagram socket, as under `Type=notify` + `WatchdogSec=`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from controller.sandbox.localbroker import LocalMosquitto
from tests.agent.harness import REPO, write_agent_config


def _messages(sock: socket.socket, until: float) -> list[dict[str, str]]:
    out = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        out.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))
    return out


def test_the_agent_notifies_ready_status_watchdog_and_stopping(
    tmp_path: Path, mosquitto: LocalMosquitto, trust_material: Any
) -> None:
    config = write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-1",
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": str(sock_path),
        "WATCHDOG_USEC": "1000000",  # WatchdogSec=1: a ping at least every 0.5 s
    }
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=str(REPO),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        seen: list[dict[str, str]] = []
        while not any(m.get("READY") == "1" for m in seen) and time.monotonic() - started < 30:
            seen += _messages(sock, time.monotonic() + 0.5)
        ready = next(m for m in seen if m.get("READY") == "1")
        assert ready["STATUS"] == f"connected to {mosquitto.url}"

        # Two seconds of a healthy idle agent: pings at the watchdog's pace, and a status line.
        window = _messages(sock, time.monotonic() + 2.0)
        pings = [m for m in window if m.get("WATCHDOG") == "1"]
        assert len(pings) >= 3, window
        statuses = [m["STATUS"] for m in seen + window if "STATUS" in m]
        assert "connected; idle" in statuses

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        tail = _messages(sock, time.monotonic() + 0.5)
        assert any(m.get("STOPPING") == "1" for m in tail), tail
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        sock.close()


def test_an_agent_that_boots_without_a_broker_still_becomes_ready_and_says_why(
    tmp_path: Path, trust_material: Any
) -> None:
    """Under Type=notify, an agent that never sent READY is killed at TimeoutStartSec and
    restarted in a loop: a robot booting out of network reach must not do that."""
    from controller.sandbox.localbroker import free_port

    unreachable = f"mqtt://127.0.0.1:{free_port()}"
    config = write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-1",
        broker_url=unreachable,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NOTIFY_SOCKET": str(sock_path),
        "JETFLEET_AGENT_BROKER__READY_WITHOUT_BROKER_S": "1.5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=str(REPO),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + 15
        while not any(m.get("READY") == "1" for m in seen) and time.monotonic() < deadline:
            seen += _messages(sock, time.monotonic() + 0.5)
        ready = [m for m in seen if m.get("READY") == "1"]
        assert len(ready) == 1, seen
        assert ready[0]["STATUS"] == f"broker unreachable, retrying: {unreachable}"
    finally:
        proc.kill()
        proc.wait()
        sock.close()
