"""systemd integration of the real agent: READY after connecting, STATUS with the job,
WATCHDOG from the worker's heartbeat, STOPPING and a clean exit on SIGTERM with the job
state kept for the next start."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from protocol.topics import Topics
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    engine_link_state,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)

DEV = "robot-6"


def _cfg(tmp_path: Path, mosquitto, trust_material) -> Path:
    return write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )


def test_notify_ready_status_watchdog_and_stopping(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    got: list[str] = []

    def drain(until: float) -> None:
        while time.monotonic() < until:
            with contextlib.suppress(TimeoutError):
                got.extend(sock.recv(4096).decode().splitlines())

    try:
        agent = AgentProcess(_cfg(tmp_path, mosquitto, trust_material), env=env).start()
        drain(time.monotonic() + 4.0)
        assert agent.stop() == 0
        drain(time.monotonic() + 0.5)
    finally:
        sock.close()
    assert "READY=1" in got
    assert any(line.startswith("STATUS=connected") for line in got)
    assert got.count("WATCHDOG=1") >= 3  # every 0.2 s while the worker is alive
    assert "STOPPING=1" in got
    assert got.index("READY=1") < got.index("STOPPING=1")


@pytest.mark.slow
def test_sigterm_mid_build_keeps_state_and_next_start_finishes(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _cfg(tmp_path, mosquitto, trust_material)
    data = tmp_path / "data"
    bundle = build_bundle(tmp_path, trust_material.release)
    with EventCollector(mosquitto.url, DEV) as events:
        agent = AgentProcess(cfg, env={"JETFLEET_AGENT_TEST_PAUSE_AT": "BUILDING"}).start()
        events.wait_online()
        cmd = make_command(DEV, "deploy", deploy_body(bundle))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        events.wait_state(cmd.command_id, "BUILDING")
        assert agent.stop() == 0  # SIGTERM: a clean exit, not a crash
        db = sqlite3.connect(data / "state.db")
        (state,) = db.execute(
            "SELECT state FROM jobs WHERE command_id=?", (cmd.command_id,)
        ).fetchone()
        db.close()
        assert state == "BUILDING"
        assert engine_link_state(data, "detector") == (None, None)
        agent = AgentProcess(cfg).start()
        try:
            assert events.wait_terminal(cmd.command_id).state.value == "SUCCEEDED"
        finally:
            agent.stop()
    assert engine_link_state(data, "detector") == ("1.0.0", None)
