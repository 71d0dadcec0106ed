"""A rollout and the fleet's desired state (issue 13), as an operator runs them: `jetfleet`
subprocesses, a real Mosquitto, real agents. While a rollout drives a robot the robot
follows it, not its group's older release; a rollout that completes becomes the group's
release, so a robot that was off through it catches up when it starts, with no
controller process running; an aborted one leaves the release where it was."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet, init_keys
from protocol.messages import JobState
from tests.agent.harness import AgentProcess, EventCollector, build_bundle
from tests.controller.fleet import (
    Behaviour,
    SimFleet,
    agent_config,
    cli_env,
    cli_ok,
    make_devices,
    rollout_start,
    run_cli,
    runs,
    wait_until,
)

pytestmark = pytest.mark.slow


def rollout(env: dict[str, str], rid: str) -> dict[str, Any]:
    return dict(json.loads(cli_ok(env, "rollout", "status", rid, "--output", "json")))


def back_to_1(events: EventCollector) -> list[Any]:
    return [e for e in events.events if e.origin == "release" and e.version == "1.0.0"]


def drift(env: dict[str, str]) -> dict[str, tuple[str, str, str]]:
    """device -> (why, runs, desired) from `jetfleet devices --drift`."""
    rows = json.loads(cli_ok(env, "devices", "--drift", "--output", "json"))
    return {r["device"]: (r["reason"], r["active"], r["want"]) for r in rows}


def set_lab_release(env: dict[str, str], version: str, bundle: Path) -> None:
    cli_ok(env, "release", "set", "detector", version, "--group", "lab", "--bundle", str(bundle))


def group_release(env: dict[str, str]) -> tuple[int, str]:
    (doc,) = json.loads(cli_ok(env, "release", "show", "--group", "lab", "--output", "json"))
    return doc["version"], doc["models"]["detector"]["version"]


def test_a_robot_off_during_a_rollout_catches_up_through_the_release_it_sets(
    tmp_path: Path, mosquitto
) -> None:
    keys = init_keys(tmp_path / "keys")
    env = cli_env(tmp_path, mosquitto.url, tmp_path / "keys")
    b = {v: build_bundle(tmp_path / "build", keys.release, version=v) for v in ("1.0.0", "2.0.0")}
    cfg = {
        d: agent_config(
            tmp_path,
            d,
            mosquitto.url,
            groups=["lab"],
            health="true",
            extra={"desired": {"jitter_s": 0.3}},
        )
        for d in ("robot-1", "robot-2")
    }
    set_lab_release(env, "1.0.0", b["1.0.0"])
    with (
        EventCollector(mosquitto.url, "robot-1") as ev1,
        EventCollector(mosquitto.url, "robot-2") as ev2,
        AgentProcess(cfg["robot-1"]) as robot1,
    ):
        with AgentProcess(cfg["robot-2"]):
            ev1.wait_status(runs("1.0.0"), timeout=90)
            ev2.wait_status(runs("1.0.0"), timeout=90)
        ev2.wait_status(lambda s: not s.online, timeout=30)  # robot-2 is off from here on
        converged_before = len(back_to_1(ev1))
        out = cli_ok(env, *rollout_start(b["2.0.0"], "group:lab", "1,100%"), "--canary",
                     "robot-1", "--approve-waves", "--wave-timeout", "120", "--offline", "skip",
                     "--output", "json")  # fmt: skip
        rid = json.loads(out)["rollout"]["id"]
        wait_until(lambda: rollout(env, rid)["rollout"]["state"] == "waiting_approval", 90,
                   "the canary wave")  # fmt: skip
        # The canary runs the rollout's version; its group's release still says 1.0.0.
        s = ev1.wait_status(runs("2.0.0"), timeout=30)
        time.sleep(2.0)  # past the convergence jitter and a settle round
        s = ev1.wait_status(lambda s: s.online and s.desired is not None, timeout=10)
        assert s.models["detector"].active == "2.0.0", robot1.log()[-2000:]
        assert s.desired is not None and s.desired.rollouts == {"detector": rid}
        assert len(back_to_1(ev1)) == converged_before  # no convergence back to 1.0.0
        assert group_release(env) == (1, "1.0.0")
        assert drift(env) == {"robot-1": ("in_rollout", "2.0.0", "1.0.0")}
        cli_ok(env, "rollout", "promote", rid)
        wait_until(lambda: rollout(env, rid)["rollout"]["state"] == "succeeded", 60,
                   "the rollout's end")  # fmt: skip
        done = rollout(env, rid)
        assert done["left_to_release"] == ["robot-2"]
        assert done["release"] == {
            "groups": [{"group": "lab", "outcome": "set", "version": 2, "reason": None}],
            "none": None,
        }
        assert group_release(env) == (2, "2.0.0")
        assert drift(env) == {"robot-2": ("offline", "1.0.0", "2.0.0")}
        # No controller process runs now; robot-2 comes back and converges on its own.
        with AgentProcess(cfg["robot-2"]) as robot2:
            s2 = ev2.wait_status(runs("2.0.0"), timeout=90)
            assert s2.desired is not None and s2.desired.releases == {"lab": 2}, robot2.log()[
                -2000:
            ]
            assert drift(env) == {}
            assert [e.state.value for e in ev2.events
                    if e.origin == "release" and e.version == "2.0.0" and e.state.terminal
                    ] == ["SUCCEEDED"]  # fmt: skip


def test_an_aborted_rollout_leaves_the_release_where_it_was_and_status_says_what_each_set(
    tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str]
) -> None:
    b = {v: build_bundle(tmp_path / "build", keys.release, version=v) for v in ("1.0.0", "2.0.0")}
    set_lab_release(env, "1.0.0", b["1.0.0"])
    devices = make_devices(3, groups=["lab"])
    devices[2].behaviour = Behaviour(outcome=JobState.FAILED)  # its gate fails: abort
    start = ("rollout", "start", str(b["2.0.0"]), "--waves", "100%", "--max-failure-rate", "0",
             "--wait", "--output", "json")  # fmt: skip
    with SimFleet(mosquitto.url, keys.trust, devices):
        out = run_cli(env, *start, "--target", "group:lab")
        assert out.returncode == 1, out.stderr
        aborted = json.loads(out.stdout)
        assert aborted["rollout"]["state"] == "aborted"
        assert group_release(env) == (1, "1.0.0")  # where it was
        none = "aborted: the group's release stays where it was"
        assert aborted["release"] == {"groups": [], "none": none}
        assert rollout(env, aborted["rollout"]["id"])["release"] == aborted["release"]
        text = cli_ok(env, "rollout", "status", aborted["rollout"]["id"])
        assert f"release: none set: {none}" in text
        # To ids, it sets none either; to the group, once every robot passes, it does.
        devices[2].behaviour = Behaviour()
        to_ids = json.loads(cli_ok(env, *start, "--target", "robot-0000"))
        assert to_ids["release"]["none"].startswith("it targets devices, not a group")
        done = json.loads(cli_ok(env, *start, "--target", "group:lab"))
    assert done["rollout"]["state"] == "succeeded"
    assert group_release(env) == (2, "2.0.0")
    assert done["release"] == {
        "groups": [{"group": "lab", "outcome": "set", "version": 2, "reason": None}],
        "none": None,
    }
    text = cli_ok(env, "rollout", "status", done["rollout"]["id"])
    assert "release: group lab v2 (detector 2.0.0)" in text
