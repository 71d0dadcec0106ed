"""Rollout policy options (issue 14) through `jetfleet rollout …` as an operator runs
them: subprocesses, a real bundle, a real broker, simulated devices speaking the real
protocol, and a background driver killed with SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path

import pytest
from fleet import (
    Behaviour,
    CommandCounter,
    SimFleet,
    make_devices,
    run_cli,
    wait_until,
)

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from protocol.messages import JobState


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--abort-on", "CRASHED>5%"], "--abort-on 'CRASHED>5%': CRASHED is not one of"),
        (["--abort-on", "FAILED"], "--abort-on 'FAILED': expected TYPE>N%"),
        (["--max-per-minute", "5000"], "--max-per-minute 5000 is not within 1..1000"),
        (["--min-finished", "-1"], "--min-finished must be 0 or more"),
        (["--start-at", "soon"], "--start-at 'soon': expected an ISO 8601 time"),
        (["--waves", "exp:0x2"], "--waves 'exp:0x2': the first wave must be at least 1"),
        (["--device-timeout", "0"], "--device-timeout must be positive"),
    ],
)
def test_bad_policy_options_exit_2_with_a_one_line_reason(
    env: dict[str, str], bundle: Path, args: list[str], message: str
) -> None:
    out = run_cli(env, "rollout", "start", str(bundle), "--target", "all", *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_scheduled_paced_rollout_keeps_its_policy_when_resumed_after_kill_9_of_its_driver(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(4)) as fleet:
        out = run_cli(
            env, "rollout", "start", str(bundle), "--target", "all", "--waves", "exp:1x2",
            "--abort-on", "ROLLED_BACK>30%,FAILED+REJECTED>10%", "--min-finished", "2",
            "--max-per-minute", "60", "--start-at", "+12s", "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        started = json.loads(out.stdout)
        rid, driver = started["rollout"]["id"], started["driver_pid"]
        policy = started["rollout"]["policy"]
        assert started["rollout"]["state"] == "scheduled"
        assert policy["abort_on"] == ["ROLLED_BACK>30%", "FAILED+REJECTED>10%"]
        assert (policy["min_finished"], policy["max_per_minute"]) == (2, 60)
        shown = run_cli({**env, "COLUMNS": "200"}, "rollout", "status", rid).stdout
        assert "SCHEDULED" in shown and "scheduled: starts at" in shown
        assert "policy: abort on ROLLED_BACK>30%,FAILED+REJECTED>10%; no abort before 2 " in shown
        assert "at most 60 commands/min" in shown

        wait_until(lambda: len(counter.arrivals) == 1, timeout=30, what="the first command")
        os.kill(driver, signal.SIGKILL)
        out = run_cli(env, "rollout", "resume", rid, "--wait", "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        done = json.loads(out.stdout)
        assert done["rollout"]["state"] == "succeeded"
        assert done["rollout"]["policy"] == policy
        assert [w["size"] for w in done["waves"]] == [1, 2, 1]
        # The pace held across the kill: one command a second, one per device.
        times = [t for t, _, _ in counter.arrivals]
        assert len(times) == 4 and sorted(d for _, d, _ in counter.arrivals) == sorted(
            fleet.devices
        )
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= 0.95, gaps


@pytest.mark.slow
def test_approve_waves_waits_across_a_kill_9_of_the_driver_and_goes_on_at_promote(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)):
        out = run_cli(
            env, "rollout", "start", str(bundle), "--target", "all", "--waves", "1,100%",
            "--approve-waves", "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        started = json.loads(out.stdout)
        rid = started["rollout"]["id"]
        assert started["rollout"]["policy"]["approve_waves"] is True

        def state() -> str:
            st = run_cli(env, "rollout", "status", rid, "--output", "json")
            return str(json.loads(st.stdout)["rollout"]["state"])

        wait_until(lambda: state() == "waiting_approval", timeout=30, what="the first wave")
        os.kill(started["driver_pid"], signal.SIGKILL)
        # A new driver (as after a controller restart) keeps waiting.
        assert run_cli(env, "rollout", "resume", rid).returncode == 0
        shown = run_cli({**env, "COLUMNS": "200"}, "rollout", "status", rid).stdout
        assert f"waiting for approval: `jetfleet rollout promote {rid}`" in shown
        assert "each wave waits for `rollout promote`" in shown
        time.sleep(1.0)
        assert state() == "waiting_approval" and len(counter.arrivals) == 1
        out = run_cli(env, "rollout", "promote", rid, "--wait", "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: state() == "succeeded", timeout=30, what="the second wave")
        assert len(counter.arrivals) == 3
        bad = run_cli(env, "rollout", "promote", rid)
        assert bad.returncode == 2
        assert "is succeeded; only one waiting for approval can be promoted" in bad.stderr


@pytest.mark.slow
def test_retry_starts_a_new_rollout_over_only_the_failed_devices_with_the_same_policy(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)) as fleet:
        fleet.devices["robot-0002"].behaviour = Behaviour(outcome=JobState.ROLLED_BACK)
        out = run_cli(
            env, "rollout", "start", str(bundle), "--target", "all", "--waves", "100%",
            "--max-failure-rate", "0.5", "--abort-on", "TIMED_OUT>50%", "--min-finished", "2",
            "--wait", "--output", "json",
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        first = json.loads(out.stdout)["rollout"]
        # The transient cause is gone (e.g. the robot's load dropped): retry the failed one.
        fleet.devices["robot-0002"].behaviour = Behaviour()
        out = run_cli(env, "rollout", "retry", first["id"], "--wait", "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        retry = json.loads(out.stdout)
        assert retry["rollout"]["id"] != first["id"]
        assert retry["rollout"]["policy"] == first["policy"]
        assert retry["rollout"]["bundle_sha256"] == first["bundle_sha256"]
        assert [(d["device_id"], d["state"]) for d in retry["devices"]] == [
            ("robot-0002", "SUCCEEDED")
        ]
        seen = counter.per_device()
        assert {d: len(c) for d, c in seen.items()} == {
            "robot-0000": 1,
            "robot-0001": 1,
            "robot-0002": 2,
        }
        assert fleet.devices["robot-0002"].models["detector"]["active"] == "2.0.0"
        again = run_cli(env, "rollout", "retry", retry["rollout"]["id"])
        assert again.returncode == 2
        assert "has no failed devices to retry" in again.stderr
