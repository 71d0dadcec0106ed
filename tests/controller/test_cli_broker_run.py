"""`jetfleet broker run`: a local broker for the tour and for development (issue 19)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from fleet import cli_env, jetfleet_cmd, run_cli

from controller.sandbox.localbroker import free_port, wait_for_port


def test_broker_run_serves_the_cli_until_stopped(tmp_path: Path) -> None:
    port = free_port()
    env = cli_env(tmp_path, f"mqtt://127.0.0.1:{port}", tmp_path / "keys")
    proc = subprocess.Popen(
        jetfleet_cmd("broker", "run", "--port", str(port), "--dir", str(tmp_path / "broker")),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=15)
        devices = run_cli(env, "devices")
        assert devices.returncode == 0, devices.stderr
        assert "0 device(s)" in devices.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert f"export JETFLEET_BROKER=mqtt://127.0.0.1:{port}" in stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # mosquitto went with it
