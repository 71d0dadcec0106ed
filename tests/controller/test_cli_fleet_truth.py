"""`jetfleet devices` and `rollout status` tell the truth about the fleet (issue 19): when
a robot was last heard, and reasons a person can read. Real `jetfleet` subprocesses, a
real broker, simulated devices speaking the real protocol."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fleet import Behaviour, SimFleet, build_bundle, make_devices, run_cli, wait_until

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from protocol.messages import REASON_MAX_CHARS, JobState


def listed(env: dict[str, str]) -> dict[str, dict[str, object]]:
    out = run_cli(env, "devices", "--output", "json")
    assert out.returncode == 0, out.stderr
    return {d["id"]: d for d in json.loads(out.stdout)}


@pytest.mark.slow
def test_an_offline_robot_is_last_seen_when_it_was_last_heard_not_when_we_looked(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], tmp_path: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)) as fleet:
        heard = time.time()
        assert listed(env)["robot-0001"]["online"] is True
        fleet.disconnect_device("robot-0001")
        wait_until(lambda: listed(env)["robot-0001"]["online"] is False, timeout=15)
        offline_at = time.time()
        time.sleep(2.0)
        gone = listed(env)["robot-0001"]
        last_seen = gone["last_seen"]
        assert isinstance(last_seen, float)
        assert heard <= last_seen < offline_at, (heard, last_seen, offline_at)
        # The will names no models; the robot still has them.
        assert gone["models"] == {"detector": {"active": "1.0.0", "previous": None}}
        table = run_cli({**env, "COLUMNS": "200"}, "devices")
        row = next(line for line in table.stdout.splitlines() if "robot-0001" in line)
        assert not re.search(r"\b0s ago", row) and "detector 1.0.0" in row  # "10s ago" is fine

        # A controller that never saw it reads the retained will: the robot's own
        # timestamp on it (when it connected), not the time of reading.
        fresh = {**env, "JETFLEET_DB": str(tmp_path / "other.db")}
        seen_fresh = listed(fresh)["robot-0001"]["last_seen"]
        assert isinstance(seen_fresh, float) and seen_fresh < time.time() - 2


def test_a_20_kb_reason_is_summarised_in_wait_status_and_json(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], tmp_path: Path
) -> None:
    names = ", ".join(f"input_{i:03d}" for i in range(200))
    huge = f"bundle inputs [{names}] do not match the model's [{names}]" * 10
    assert len(huge) > 20_000
    devices = make_devices(1)
    devices[0].behaviour = Behaviour(outcome=JobState.REJECTED, code="bundle_invalid", reason=huge)
    bundle = build_bundle(tmp_path / "build", keys.release, version="2.0.0")
    with SimFleet(mosquitto.url, keys.trust, devices):
        out = run_cli(
            {**env, "COLUMNS": "200"}, "rollout", "start", str(bundle), "--target", "all",
            "--waves", "100%", "--wait",
        )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "bundle inputs [input_000, input_001" in out.stdout
    assert "more characters]" in out.stdout
    assert len(out.stdout) < 4000, len(out.stdout)
    rid = run_cli(env, "rollout", "list", "-o", "json")
    rollout_id = json.loads(rid.stdout)[0]["id"]
    status = run_cli(env, "rollout", "status", rollout_id, "-o", "json")
    (device,) = json.loads(status.stdout)["devices"]
    assert len(device["reason"]) <= REASON_MAX_CHARS
    assert device["reason"].startswith("bundle inputs [input_000")
