"""Rollouts to REAL agents (`python -m agent.cli run` subprocesses) on a real Mosquitto.

Three robots. robot-c runs a fast build of `detector`; robot-a and robot-b run a slow
build (same outputs, genuine extra matmuls). Every new version is the slow build, so on
robot-c, and only there, the agent's own speed gate measures a real latency regression
against its active engine and rolls back: a device whose gate genuinely fails.

The tests share the three agents (starting and provisioning them costs most of the time)
and deploy increasing versions, so they run in file order.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fleet import (
    AgentFleet,
    CommandCounter,
    agent_lab,
    build_bundle,
    jetfleet_cmd,
    rollout_start,
    start_agents,
    wait_until,
)

from controller.sandbox.localbroker import LocalMosquitto

# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_rollout_agents")]

DIMS = {"in_dim": 256, "hidden": 512, "out_dim": 64, "layers": 3}
SLOW = 3.0  # extra_work of the slow build: about 4x the multiply-adds
# Same-speed builds pass even on a busy 2-core machine; 4x slower fails clearly.
GATE = {"probation_s": 0, "max_regression_pct": 100}
DEVICES = ("robot-a", "robot-b", "robot-c")


@dataclass
class Fleet(AgentFleet):
    broker: LocalMosquitto

    def bundle(self, version: str, extra_work: float = SLOW) -> Path:
        return build_bundle(
            self.root / "build",
            self.keys.release,
            version=version,
            extra_work=extra_work,
            gate=GATE,
            **DIMS,
        )

    def active(self, device: str) -> str | None:
        return self.actives()[device]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("agents")
    with agent_lab(root) as (keys, broker, env):
        agents = []
        try:
            agents = start_agents(root, broker.url, DEVICES, telemetry_interval_s=60)
            f = Fleet(env, keys, root, broker)
            wait_until(
                lambda: sum(d["online"] for d in f.devices().values()) == 3,
                timeout=60,
                what="three agents online",
            )
            # Provision: the fast build on robot-c, the slow one on robot-a and robot-b.
            for version, extra, target in (
                ("1.0.0", 0.0, "robot-c"),
                ("1.0.1", SLOW, "robot-a,robot-b"),
            ):
                bundle = f.bundle(version, extra)
                out = f.jetfleet(*rollout_start(bundle, target, "100%", "--wait"))
                assert out.returncode == 0, out.stdout + out.stderr + agents[0].log()[-2000:]
            yield f
        finally:
            for a in agents:
                a.stop()


def test_gate_failure_on_the_canary_aborts_before_the_others_get_a_command_and_a_tolerant_threshold_completes_with_one_rolled_back(  # noqa: E501
    fleet: Fleet,
) -> None:
    counter = CommandCounter(fleet.broker.url)
    try:
        bundle = fleet.bundle("2.0.0")
        out = fleet.jetfleet(
            *rollout_start(bundle, "all", "1,100%"),
            "--canary",
            "robot-c",
            "--wait",
            "--output",
            "json",
        )
        assert out.returncode == 1, out.stderr
        data = json.loads(out.stdout)
        assert data["rollout"]["state"] == "aborted"
        states = {d["device_id"]: d["state"] for d in data["devices"]}
        assert states == {"robot-c": "ROLLED_BACK", "robot-a": "WAITING", "robot-b": "WAITING"}
        failure = data["failures"][0]
        assert failure["code"] == "latency_regression", failure
        assert set(counter.per_device()) == {"robot-c"}
        assert fleet.active("robot-c") == "1.0.0"

        # Same bundle, robot-a as canary, a threshold that tolerates one failure in three.
        out = fleet.jetfleet(
            *rollout_start(bundle, "all", "1,100%"),
            "--max-failure-rate",
            "0.34",
            "--wait",
            "--output",
            "json",
        )
        assert out.returncode == 0, out.stdout + out.stderr
        data = json.loads(out.stdout)
        states = {d["device_id"]: d["state"] for d in data["devices"]}
        assert states == {"robot-a": "SUCCEEDED", "robot-b": "SUCCEEDED", "robot-c": "ROLLED_BACK"}
        actives = {d: fleet.active(d) for d in DEVICES}
        assert actives == {"robot-a": "2.0.0", "robot-b": "2.0.0", "robot-c": "1.0.0"}
    finally:
        counter.close()


def test_abort_in_the_second_wave_rolls_the_first_wave_back_to_the_old_version(
    fleet: Fleet,
) -> None:
    before = {d: fleet.active(d) for d in DEVICES}
    bundle = fleet.bundle("3.0.0")
    out = fleet.jetfleet(
        *rollout_start(bundle, "all", "2,100%"),
        "--max-failure-rate",
        "0.2",
        "--wait",
        "--output",
        "json",
    )
    assert out.returncode == 1, out.stdout + out.stderr
    data = json.loads(out.stdout)
    devices = {d["device_id"]: d for d in data["devices"]}
    assert devices["robot-c"]["state"] == "ROLLED_BACK"
    for d in ("robot-a", "robot-b"):
        assert devices[d]["state"] == "SUCCEEDED"
        assert devices[d]["rb_state"] == "SUCCEEDED", devices[d]
        assert devices[d]["rb_to_version"] == before[d]
    # The agents' retained status shows the old version active again.
    wait_until(
        lambda: all(fleet.active(d) == before[d] for d in DEVICES),
        timeout=30,
        what="the first wave back on its old version",
    )


def test_controller_killed_during_a_wave_resumes_with_no_duplicate_command(
    fleet: Fleet,
) -> None:
    counter = CommandCounter(fleet.broker.url)
    try:
        bundle = fleet.bundle("4.0.0")
        proc = subprocess.Popen(
            jetfleet_cmd(
                *rollout_start(bundle, "robot-a,robot-b", "1,100%"),
                "--wait",
                "--output",
                "json",
            ),
            env=fleet.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def in_second_wave() -> bool:
            conn = sqlite3.connect(fleet.env["JETFLEET_DB"])
            try:
                rows = conn.execute(
                    "SELECT a.state FROM assignments a JOIN rollouts r ON r.id=a.rollout_id "
                    "WHERE r.version='4.0.0' AND a.wave=1 AND a.published_at IS NOT NULL"
                ).fetchall()
            finally:
                conn.close()
            return bool(rows)

        wait_until(in_second_wave, timeout=120, what="the second wave's command published")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        conn = sqlite3.connect(fleet.env["JETFLEET_DB"])
        rid = conn.execute("SELECT id FROM rollouts WHERE version='4.0.0'").fetchone()[0]
        conn.close()
        out = fleet.jetfleet("rollout", "resume", rid, "--wait", "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        data = json.loads(out.stdout)
        assert [d["state"] for d in data["devices"]] == ["SUCCEEDED", "SUCCEEDED"]
        seen = counter.per_device()
        assert sorted(seen) == ["robot-a", "robot-b"]
        for device, commands in seen.items():
            assert len(commands) == 1, (device, commands)
        assert fleet.active("robot-a") == fleet.active("robot-b") == "4.0.0"
    finally:
        counter.close()


class SlowBundleServer:
    """Serves one file over HTTP at about 100 KiB/s: a robot on a poor link."""

    def __init__(self, path: Path) -> None:
        import http.server
        import threading
        import time

        data = path.read_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for i in range(0, len(data), 16384):
                        self.wfile.write(data[i : i + 16384])
                        time.sleep(0.16)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the agent hung up: the job was canceled

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{path.name}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def test_operator_abort_cancels_a_real_agents_job_in_flight(fleet: Fleet) -> None:
    before = fleet.active("robot-a")
    bundle = fleet.bundle("5.0.0")
    server = SlowBundleServer(bundle)
    try:
        out = fleet.jetfleet(
            *rollout_start(bundle, "robot-a", "100%"),
            "--bundle-url",
            server.url,
            "--output",
            "json",
        )
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout)["rollout"]["id"]

        def downloading() -> bool:
            conn = sqlite3.connect(fleet.env["JETFLEET_DB"])
            try:
                row = conn.execute(
                    "SELECT state FROM assignments WHERE rollout_id=?", (rid,)
                ).fetchone()
            finally:
                conn.close()
            return row is not None and row[0] == "DOWNLOADING"

        wait_until(downloading, timeout=60, what="the agent downloading the bundle")
        out = fleet.jetfleet("rollout", "abort", rid, "--wait", "--output", "json")
        assert out.returncode == 1, out.stdout + out.stderr
        data = json.loads(out.stdout)
        assert data["rollout"]["state"] == "aborted"
        assert data["devices"][0]["state"] == "CANCELED", data["devices"][0]
        assert fleet.active("robot-a") == before != "5.0.0"
    finally:
        server.close()


def test_min_finished_lets_a_failing_canary_pass_and_the_rolled_back_share_then_aborts(
    fleet: Fleet,
) -> None:
    """Abort criteria on real agents: robot-c's gate rolls 6.0.0 back. It is the canary;
    --min-finished 3 keeps that one failure from deciding, the second wave runs, and at
    the end ROLLED_BACK (1 of 3) crosses its own 20% threshold though --max-failure-rate
    would tolerate it: the rollout aborts naming that type, and robot-a and robot-b go
    back to the version they ran."""
    before = {d: fleet.active(d) for d in ("robot-a", "robot-b")}
    out = fleet.jetfleet(
        "rollout", "start", str(fleet.bundle("6.0.0")), "--target", "all",
        "--waves", "1,100%", "--canary", "robot-c", "--max-failure-rate", "1",
        "--abort-on", "FAILED>0%,ROLLED_BACK>20%", "--min-finished", "3",
        "--wait", "--output", "json",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["rollout"]["abort_reason"] == (
        "ROLLED_BACK 33% (1 of 3) crossed --abort-on ROLLED_BACK>20% in wave 2"
    )
    devices = {d["device_id"]: d for d in data["devices"]}
    assert devices["robot-c"]["state"] == "ROLLED_BACK"
    for d in ("robot-a", "robot-b"):
        assert devices[d]["state"] == "SUCCEEDED" and devices[d]["rb_state"] == "SUCCEEDED"
    wait_until(
        lambda: all(fleet.active(d) == v for d, v in before.items()),
        timeout=30,
        what="robot-a and robot-b back on their old version",
    )


def test_scheduled_exponential_paced_rollout_to_real_agents(fleet: Fleet) -> None:
    """Pace on real agents: stored SCHEDULED until --start-at, waves of 1 then 2
    (exp:1x2), and commands released one per 2 s (--max-per-minute 30)."""
    counter = CommandCounter(fleet.broker.url)
    try:
        out = fleet.jetfleet(
            "rollout", "start", str(fleet.bundle("7.0.0")), "--target", "robot-a,robot-b",
            "--waves", "exp:1x2", "--max-per-minute", "30", "--start-at", "+4s",
            "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        started = json.loads(out.stdout)
        assert started["rollout"]["state"] == "scheduled"
        rid, start_at = started["rollout"]["id"], started["rollout"]["policy"]["start_at"]

        def status() -> dict:  # type: ignore[type-arg]
            st = fleet.jetfleet("rollout", "status", rid, "--output", "json")
            return json.loads(st.stdout)  # type: ignore[no-any-return]

        wait_until(lambda: status()["rollout"]["state"] == "succeeded", timeout=180, what="7.0.0")
        data = status()
        assert [w["size"] for w in data["waves"]] == [1, 1]
        commanded = sorted(d["commanded_at"] for d in data["devices"])
        assert commanded[0] >= start_at
        assert commanded[1] - commanded[0] >= 2.0 - 1e-6
        assert len(counter.arrivals) == 2
        assert fleet.active("robot-a") == fleet.active("robot-b") == "7.0.0"
    finally:
        counter.close()


def test_approve_waves_holds_the_second_wave_of_real_agents_until_promote(fleet: Fleet) -> None:
    """Approval on real agents: robot-a deploys 8.0.0, then the rollout waits; robot-b gets
    its command only after `rollout promote`."""
    counter = CommandCounter(fleet.broker.url)
    try:
        out = fleet.jetfleet(
            "rollout", "start", str(fleet.bundle("8.0.0")), "--target", "robot-a,robot-b",
            "--waves", "1,100%", "--approve-waves", "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        rid = json.loads(out.stdout)["rollout"]["id"]

        def state() -> str:
            st = fleet.jetfleet("rollout", "status", rid, "--output", "json")
            return str(json.loads(st.stdout)["rollout"]["state"])

        wait_until(lambda: state() == "waiting_approval", timeout=120, what="robot-a's wave")
        assert fleet.active("robot-a") == "8.0.0" and fleet.active("robot-b") != "8.0.0"
        assert set(counter.per_device()) == {"robot-a"}
        out = fleet.jetfleet("rollout", "promote", rid, "--wait", "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: state() == "succeeded", timeout=120, what="robot-b's wave")
        assert fleet.active("robot-b") == "8.0.0"
    finally:
        counter.close()


def test_device_timeout_cancels_a_real_agent_stuck_downloading(fleet: Fleet) -> None:
    """--device-timeout on a real agent: its download trickles (100 KiB/s), so its job stays
    DOWNLOADING past 3 s; the controller counts it TIMED_OUT long before the wave's
    deadline and cancels it, and the agent keeps the version it ran."""
    before = fleet.active("robot-a")
    bundle = fleet.bundle("9.0.0")
    server = SlowBundleServer(bundle)
    try:
        out = fleet.jetfleet(
            "rollout", "start", str(bundle), "--target", "robot-a", "--waves", "100%",
            "--bundle-url", server.url, "--device-timeout", "3", "--wave-timeout", "300",
            "--max-failure-rate", "1", "--wait", "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        data = json.loads(out.stdout)
        device = data["devices"][0]
        assert device["state"] == "TIMED_OUT", device
        assert device["reason"] == "stuck in DOWNLOADING for more than 3s (--device-timeout)"

        assert device["cx_command_id"] is not None

        def download_stopped() -> bool:
            job = fleet.devices()["robot-a"].get("job") or {}
            return job.get("command_id") != device["command_id"] or job.get("state") == "CANCELED"

        wait_until(download_stopped, timeout=30, what="the agent canceling the stuck job")
        assert fleet.active("robot-a") == before != "9.0.0"
    finally:
        server.close()


def test_retries_turn_a_mirror_outage_on_a_real_agent_into_a_success(fleet: Fleet) -> None:
    """--retries on a real agent: the bundle server is down, so the agent's download fails
    (FAILED, download_failed, after its own retries); the controller waits its back-off and
    sends a new command, which succeeds once the server is up. With --max-failure-rate 0
    the first failure would have aborted had it counted."""
    import functools
    import http.server
    import socket
    import threading

    bundle = fleet.bundle("10.0.0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here until the "mirror" comes back
    out = fleet.jetfleet(
        "rollout", "start", str(bundle), "--target", "robot-a", "--waves", "100%",
        "--bundle-url", f"http://127.0.0.1:{port}/{bundle.name}", "--max-failure-rate", "0",
        "--retries", "2", "--retry-on", "FAILED", "--retry-backoff", "3", "--output", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rid = json.loads(out.stdout)["rollout"]["id"]

    def status() -> dict:  # type: ignore[type-arg]
        st = fleet.jetfleet("rollout", "status", rid, "--output", "json")
        return json.loads(st.stdout)  # type: ignore[no-any-return]

    seen: list[dict] = []  # type: ignore[type-arg]

    def retried() -> bool:
        seen[:] = status()["devices"]
        return bool(seen[0]["attempts"] == 1)

    wait_until(retried, timeout=60, what="a retry")
    # Seen while it waited for its back-off, or already re-sent (its reason then cleared).
    assert (seen[0]["reason"] or "retry 1 of 2 after FAILED").startswith(
        "retry 1 of 2 after FAILED"
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(bundle.parent))
    mirror = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    try:
        wait_until(lambda: status()["rollout"]["state"] == "succeeded", timeout=120)
        device = status()["devices"][0]
        assert (device["state"], device["attempts"]) == ("SUCCEEDED", 1)
        assert fleet.active("robot-a") == "10.0.0"
    finally:
        mirror.shutdown()


def test_staged_robots_serve_the_old_engine_until_activate_switches_them_in_seconds(
    fleet: Fleet,
) -> None:
    robots = ("robot-a", "robot-b")
    before = {d: fleet.active(d) for d in robots}
    t0 = time.monotonic()
    out = fleet.jetfleet(
        *rollout_start(fleet.bundle("11.0.0"), ",".join(robots), "100%"),
        "--stage", "--wait", "--output", "json",
    )  # fmt: skip
    stage_s = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    rid = data["rollout"]["id"]
    assert data["rollout"]["state"] == "staged" and data["staged"] == list(robots)
    assert {d["device_id"]: d["state"] for d in data["devices"]} == dict.fromkeys(robots, "STAGED")
    assert all(d["gate"] for d in data["devices"])  # gated before they wait
    assert {d: fleet.active(d) for d in robots} == before  # the old engines serve

    t1 = time.monotonic()
    out = fleet.jetfleet("rollout", "activate", rid, "--waves", "1,100%", "--wait",
                         "--output", "json")  # fmt: skip
    activate_s = time.monotonic() - t1
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["rollout"]["state"] == "succeeded"
    assert [d["state"] for d in data["devices"]] == ["SUCCEEDED", "SUCCEEDED"]
    wait_until(lambda: all(fleet.active(d) == "11.0.0" for d in robots), timeout=30,
               what="both robots on 11.0.0")  # fmt: skip
    print(f"stage (download, build, gate) {stage_s:.1f}s; activate to all SUCCEEDED "
          f"{activate_s:.1f}s (two waves)")  # fmt: skip


def test_abort_of_a_staged_rollout_ends_once_the_real_agents_canceled_their_staged_jobs(
    fleet: Fleet,
) -> None:
    """The agent answers a cancel of its STAGED job at once (the cancel SUCCEEDED, then the
    job CANCELED, code canceled): the abort waits for that, and ends with no robot STAGED."""
    robots = ("robot-a", "robot-b")
    before = {d: fleet.active(d) for d in robots}
    out = fleet.jetfleet(
        *rollout_start(fleet.bundle("12.0.0"), ",".join(robots), "100%"),
        "--stage", "--wait", "--output", "json",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rid = json.loads(out.stdout)["rollout"]["id"]
    t0 = time.monotonic()
    out = fleet.jetfleet("rollout", "abort", rid, "--wait", "--output", "json")
    abort_s = time.monotonic() - t0
    assert out.returncode == 1, out.stdout + out.stderr  # aborted
    data = json.loads(out.stdout)
    assert data["rollout"]["state"] == "aborted"
    ended = {d["device_id"]: (d["state"], d["code"]) for d in data["devices"]}
    assert ended == dict.fromkeys(robots, ("CANCELED", "canceled")), data["devices"]
    assert (data["staged"], data["cancels_pending"], data["cancels_unacknowledged"]) == ([], [], [])
    assert {d: fleet.active(d) for d in robots} == before  # the old engines never stopped
    print(f"abort of a staged rollout to all CANCELED {abort_s:.1f}s")
