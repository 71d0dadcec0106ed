"""Controller faults named for what they are, through real `jetfleet` processes: a full
database disk under a running rollout, and a bundle URL chosen without `serve`'s state
file."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fleet import SimFleet, cli_env, jetfleet_cmd, make_devices, run_cli, wait_until

from controller.sandbox.localbroker import LocalMosquitto, free_port
from controller.security.keystore import KeySet
from controller.server.state import read_serve_state
from protocol.messages import DeviceStatus
from protocol.telemetry import TelemetrySample
from protocol.topics import Topics
from tests.agent.harness import Publisher
from tests.diskfull import fill, small_tmpfs


def rows(db: Path, sql: str) -> list[sqlite3.Row]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


@pytest.mark.slow
def test_a_full_db_disk_stops_the_rollout_in_one_line_status_says_why_and_resume_continues(
    mosquitto: LocalMosquitto, keys: KeySet, bundle: Path, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, mosquitto.url, tmp_path / "keys")
    devices = make_devices(1)
    devices[0].behaviour.silent = True  # the wave ends by its timeout: a write to come
    with small_tmpfs(tmp_path / "db", "8m") as mnt, SimFleet(mosquitto.url, keys.trust, devices):
        db = mnt / "controller.db"
        env["JETFLEET_DB"] = str(db)
        proc = subprocess.Popen(
            jetfleet_cmd("rollout", "start", str(bundle), "--target", "all", "--waves", "100%",
                         "--wave-timeout", "3", "--wait"),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_until(
            lambda: bool(rows(db, "SELECT 1 FROM assignments WHERE published_at IS NOT NULL")),
            timeout=30,
            what="the command published",
        )
        filler = fill(mnt)
        _, err = proc.communicate(timeout=30)
        rid = rows(db, "SELECT id FROM rollouts")[0]["id"]
        assert proc.returncode == 1, err
        assert "Traceback" not in err and "sqlite3" not in err, err
        assert err.strip().splitlines()[-1] == (
            f"jetfleet: the disk holding {db} is full: rollout {rid} stopped at its last saved "
            f"step; free space, then `jetfleet rollout resume {rid}`"
        )

        status = run_cli({**env, "COLUMNS": "200"}, "rollout", "status", rid)
        assert status.returncode == 0, status.stderr
        assert f"the disk holding {db} is full" in status.stdout
        assert f"jetfleet rollout resume {rid}" in status.stdout

        filler.unlink()
        resumed = run_cli(env, "rollout", "resume", rid, "--wait", "--output", "json")
        assert "Traceback" not in resumed.stderr, resumed.stderr
        assert json.loads(resumed.stdout)["rollout"]["state"] == "aborted"  # the silent device
        assert rows(db, "SELECT state FROM assignments")[0]["state"] == "TIMED_OUT"


@pytest.mark.slow
def test_rollout_start_says_which_bundle_url_it_chose_and_why(
    mosquitto: LocalMosquitto, keys: KeySet, bundle: Path, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, mosquitto.url, tmp_path / "keys")
    data = Path(env["JETFLEET_DB"]).parent
    port = free_port()
    serve = subprocess.Popen(
        jetfleet_cmd("serve", "--no-ingest", "--host", "127.0.0.1", "--http-port", str(port),
                     "--advertise-host", "127.0.0.1"),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: read_serve_state(data) is not None, timeout=30, what="serve's state")
        start = ("rollout", "start", str(bundle), "--target", "all", "--waves", "100%", "--wait")
        with SimFleet(mosquitto.url, keys.trust, make_devices(1)):
            same = run_cli(env, *start)
            assert same.returncode == 0, same.stderr
            assert (
                f"jetfleet: bundle URL http://127.0.0.1:{port}/bundles/detector-2.0.0.jfb: from "
                f"the running `jetfleet serve` (pid {serve.pid}, {data / 'serve.json'})"
            ) in same.stderr

            moved = {**env, "JETFLEET_DB": str(tmp_path / "moved" / "controller.db")}
            other = run_cli(moved, *start)
            assert other.returncode == 0, other.stderr
            line = next(ln for ln in other.stderr.splitlines() if "bundle URL" in ln)
            assert line.startswith("jetfleet: bundle URL file:///")
            assert (
                f"no `jetfleet serve` state file at {tmp_path / 'moved' / 'serve.json'} "
                "(serve writes it next to its --db)"
            ) in line
            assert "pass --bundle-url" in line
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)


@pytest.mark.slow
def test_devices_flags_a_clock_ahead_or_behind(mosquitto: LocalMosquitto, tmp_path: Path) -> None:
    """robot-ahead writes its status 2 h in the future; robot-behind's clock is 3 days
    back, which its telemetry (received now by `jetfleet serve`) shows; robot-ok is right."""
    env = cli_env(tmp_path, mosquitto.url, tmp_path / "keys")
    data = Path(env["JETFLEET_DB"]).parent
    now = datetime.now(timezone.utc)
    clocks = {"robot-ahead": now + timedelta(hours=2), "robot-behind": now - timedelta(days=3),
              "robot-ok": now}  # fmt: skip
    serve = subprocess.Popen(
        jetfleet_cmd("serve", "--host", "127.0.0.1", "--http-port", str(free_port())),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: read_serve_state(data) is not None, timeout=30, what="serve's state")
        with Publisher(mosquitto.url) as pub:
            for device_id, at in clocks.items():
                status = DeviceStatus.new(device_id=device_id, online=True, at=at)
                # Retained, as the agent publishes it.
                pub.client.publish(Topics().status(device_id), status.encode(), qos=1, retain=True)
                sample = TelemetrySample.new(device_id=device_id, at=at, uptime_s=60)
                pub.publish(Topics().telemetry(device_id), sample.encode())
        wait_until(
            lambda: len(rows(data / "telemetry.db", "SELECT 1 FROM device_latest")) == 3,
            timeout=30,
            what="telemetry stored",
        )
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)

    out = run_cli(env, "devices", "--output", "json")
    assert out.returncode == 0, out.stderr
    skew = {d["id"]: d["clock_skew_s"] for d in json.loads(out.stdout)}
    assert skew["robot-ok"] is None
    assert skew["robot-ahead"] == pytest.approx(7200, abs=60)
    assert skew["robot-behind"] == pytest.approx(-3 * 86400, abs=60)

    human = run_cli({**env, "COLUMNS": "200"}, "devices")
    assert "2.0h ahead" in human.stdout and "3.0d behind" in human.stdout
    assert (
        "jetfleet: robot-behind's clock is 3.0d behind: every command to it fails (expired or "
        "issued in the future); enable NTP on it"
    ) in human.stderr
    assert "robot-ok's clock" not in human.stderr
