"""Staged activation (issue 14) against the rollout engine, a real Mosquitto and simulated
devices speaking the real protocol: `--stage` leaves every robot STAGED with its old
engine serving and the rollout `staged`; `rollout activate` switches them in waves with
signed `activate` commands, under the usual failure threshold, abort and rollback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet import Behaviour, CommandCounter, ControllerHarness, SimFleet, make_devices, wait_until

from controller.rollouts.activation import ActivationError, activate_staged
from controller.rollouts.store import ABORTED, STAGED, SUCCEEDED, Rollout
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from protocol.messages import JobState


@pytest.fixture
def harness(tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet) -> ControllerHarness:
    return ControllerHarness(tmp_path / "controller.db", mosquitto.url, keys.operator)


def staged(harness: ControllerHarness, fleet: SimFleet, version: str = "2.0.0") -> Rollout:
    """A --stage rollout of `version` over the whole fleet, driven until it rests `staged`."""
    harness.sync()
    rid = harness.create(sorted(fleet.devices), waves_spec="1,100%", stage=True, version=version)
    result = harness.drive(rid)
    assert result.state == STAGED, result
    return result  # type: ignore[no-any-return]


def activate(harness: ControllerHarness, r: Rollout, **kw: object) -> Rollout:
    plan = activate_staged(harness.store, r.id, waves_spec=kw.pop("waves", "1,100%"),  # type: ignore[arg-type]
                           max_failure_rate=None, wave_timeout=None, auto_rollback=None,
                           policy=r.policy, now=time.time(), **kw)  # type: ignore[arg-type]  # fmt: skip
    return plan.rollout


def test_staged_robots_keep_their_engine_until_activated_then_switch_in_waves(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(4)) as fleet:
        r = staged(harness, fleet)
        states = {a.device_id: a.state for a in harness.store.assignments(r.id)}
        assert set(states.values()) == {"STAGED"}
        assert {d.models["detector"]["active"] for d in fleet.devices.values()} == {"1.0.0"}
        assert harness.store.summary(r.id).staged == sorted(fleet.devices)

        final = harness.drive(activate(harness, r).id)
        assert final.state == SUCCEEDED, final.abort_reason
        assert {d.models["detector"]["active"] for d in fleet.devices.values()} == {"2.0.0"}
        waves = [w for w in harness.store.waves(r.id) if w.state == "done"]
        assert [w.size for w in waves] == [1, 3]  # the activation's own waves
        # One deploy and one activate per robot, nothing else.
        wait_until(lambda: len(counter.arrivals) == 8, what="eight commands")
        kinds = {d: sorted(m.split(":")[0] for m in ms) for d, ms in counter.per_device().items()}
        assert kinds == {d: ["activate", "deploy"] for d in fleet.devices}


def test_a_failed_activation_canary_aborts_and_the_staged_rest_are_canceled(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)) as fleet:
        canary = "robot-0000"
        fleet.devices[canary].behaviour = Behaviour(outcome=JobState.ROLLED_BACK)
        r = staged(harness, fleet)
        final = harness.drive(activate(harness, r, canary=canary).id)
        assert final.state == ABORTED and "failure rate" in (final.abort_reason or "")
        a = {a.device_id: a for a in harness.store.assignments(r.id)}
        assert a[canary].state == "ROLLED_BACK"
        # The rest never got an `activate`: each staged job gets a signed cancel instead
        # (the rollout does not wait for it: a robot offline now cancels when it returns).
        rest = ("robot-0001", "robot-0002")
        assert all(a[d].ac_command_id is None and a[d].cx_command_id for d in rest)
        wait_until(lambda: all(fleet.devices[d].progress[a[d].command_id or ""]
                               is JobState.CANCELED for d in rest), what="the cancels")  # fmt: skip
        assert {d.models["detector"]["active"] for d in fleet.devices.values()} == {"1.0.0"}


def test_a_robot_whose_staged_job_is_gone_is_reported_not_failed(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)) as fleet:
        r = staged(harness, fleet)
        gone = harness.store.assignment(r.id, "robot-0002")
        assert gone is not None and gone.command_id
        fleet.devices["robot-0002"].progress[gone.command_id] = JobState.CANCELED  # expired
        final = harness.drive(activate(harness, r, waves="100%").id)
        assert final.state == SUCCEEDED, final.abort_reason  # max failure rate 0: not counted
        summary = harness.store.summary(r.id)
        assert [d["device_id"] for d in summary.not_staged] == ["robot-0002"]
        assert fleet.devices["robot-0002"].models["detector"]["active"] == "1.0.0"


def test_only_a_staged_rollout_can_be_activated_and_only_once(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)) as fleet:
        harness.sync()
        plain = harness.create(sorted(fleet.devices), waves_spec="100%")
        assert harness.drive(plain).state == SUCCEEDED
        r = harness.store.get(plain)
        assert r is not None
        with pytest.raises(ActivationError, match="only a staged rollout can be activated"):
            activate(harness, r)
        s = staged(harness, fleet, "2.1.0")
        activate(harness, s)
        with pytest.raises(ActivationError, match="is running"):
            activate(harness, s)
