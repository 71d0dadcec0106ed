"""systemd integration of the real agent: READY after connecting, STATUS with the job,
WATCHDOG from the worker's heartbeat, STOPPING and a clean exit on SIGTERM with the job
state kept for the next start."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
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


class NotifySocket:
    """systemd's end of $NOTIFY_SOCKET: read on a thread of its own, as systemd always
    reads, so the agent's sends never wait on the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.lines.extend(self._sock.recv(4096).decode().splitlines())

    def __enter__(self) -> NotifySocket:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # what the agent sent last is read
        self._stop.set()
        self._thread.join()
        self._sock.close()


def test_notify_ready_status_watchdog_and_stopping(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    with NotifySocket(tmp_path / "notify.sock") as notify:
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
        agent = AgentProcess(_cfg(tmp_path, mosquitto, trust_material), env=env).start()
        deadline = time.monotonic() + 30.0
        while notify.lines.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.stop() == 0
    got = notify.lines
    assert "READY=1" in got
    assert any(line.startswith("STATUS=connected") for line in got)
    assert got.count("WATCHDOG=1") >= 3  # every 0.2 s while the worker is alive
    assert "STOPPING=1" in got
    assert got.index("READY=1") < got.index("STOPPING=1")


def test_a_supervisor_that_stops_reading_does_not_keep_the_agent_from_stopping(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as never_read:
        never_read.bind(str(path))
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        with EventCollector(mosquitto.url, DEV) as events:
            agent = AgentProcess(_cfg(tmp_path, mosquitto, trust_material), env=env).start()
            events.wait_online()
            time.sleep(3.0)  # ten watchdog pings fill the socket's queue; the rest wait
            assert agent.stop(timeout=15.0) == 0


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
