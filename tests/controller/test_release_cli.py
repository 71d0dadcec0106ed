"""`jetfleet release …` as an operator runs it (subprocesses) against a real Mosquitto and a
real agent: the controller only publishes; the robot converges on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.security.keystore import init_keys
from tests.agent.harness import AgentProcess, EventCollector, build_bundle
from tests.controller.fleet import agent_config, cli_env, cli_ok, run_cli, runs

pytestmark = pytest.mark.slow


def test_release_set_pin_unpin_show_and_history_drive_a_robot_with_no_controller_running(
    tmp_path: Path, mosquitto
) -> None:
    keys = init_keys(tmp_path / "keys")
    env = cli_env(tmp_path, mosquitto.url, tmp_path / "keys")
    b1 = build_bundle(tmp_path / "build", keys.release, version="1.0.0")
    b2 = build_bundle(tmp_path / "build", keys.release, version="2.0.0")
    cfg = agent_config(
        tmp_path, "robot-1", mosquitto.url, groups=["lab"], health="true",
        extra={"desired": {"jitter_s": 0.3}},
    )  # fmt: skip
    # Set while the robot is off; every CLI call has exited before it starts.
    doc = json.loads(cli_ok(env, "release", "set", "detector", "1.0.0", "--group", "lab",
                            "--bundle", str(b1), "--output", "json"))  # fmt: skip
    assert (doc["group"], doc["version"], doc["models"]["detector"]["version"]) == (
        "lab",
        1,
        "1.0.0",
    )
    shown = json.loads(cli_ok(env, "release", "show", "--output", "json"))
    assert [(d["group"], d["version"]) for d in shown] == [("lab", 1)]
    with EventCollector(mosquitto.url, "robot-1") as events, AgentProcess(cfg) as agent:
        events.wait_status(runs("1.0.0"), timeout=90)
        cli_ok(env, "release", "pin", "robot-1", "detector", "1.0.0")
        events.wait_status(lambda s: s.desired is not None and s.desired.pins_version == 1)
        cli_ok(env, "release", "set", "detector", "2.0.0", "--group", "lab", "--bundle", str(b2))
        s = events.wait_status(lambda s: s.desired is not None and s.desired.releases == {"lab": 2})
        assert s.models["detector"].active == "1.0.0", agent.log()[-2000:]
        cli_ok(env, "release", "unpin", "robot-1")
        events.wait_status(runs("2.0.0"), timeout=90)
    again = json.loads(cli_ok(env, "release", "retry", "--group", "lab", "--output", "json"))
    assert (again["version"], again["retry"], again["models"]["detector"]["version"]) == (
        3,
        True,
        "2.0.0",
    )
    history = json.loads(cli_ok(env, "release", "history", "--output", "json"))
    assert sorted((h["scope"], h["version"]) for h in history) == [
        ("device:robot-1", 1),
        ("device:robot-1", 2),
        ("group:lab", 1),
        ("group:lab", 2),
        ("group:lab", 3),
    ]


def test_release_set_of_an_unpublished_version_fails_with_one_line(
    tmp_path: Path, mosquitto
) -> None:
    init_keys(tmp_path / "keys")
    env = cli_env(tmp_path, mosquitto.url, tmp_path / "keys")
    out = run_cli(env, "release", "set", "detector", "9.9.9", "--group", "lab")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("jetfleet: detector 9.9.9 is not published")
    assert len(out.stderr.strip().splitlines()) == 1
