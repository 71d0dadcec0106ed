"""Staged activation (issue 14) against the rollout engine, a real Mosquitto and simulated
devices speaking the real protocol: `--stage` leaves every robot STAGED with its old
engine serving and the rollout `staged`; `rollout activate` switches them in waves with
signed `activate` commands, under the usual failure threshold, abort and rollback. An
abort waits, up to the wave timeout, for each STAGED robot to answer its cancel; a
driver killed mid-activation is resumed without a second command to any robot."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fleet import (
    Behaviour,
    CommandCounter,
    ControllerHarness,
    SimFleet,
    jetfleet_cmd,
    make_devices,
    wait_until,
)
from rich.console import Console

from controller.cli.common import render
from controller.rollouts.activation import ActivationError, activate_staged
from controller.rollouts.store import (
    ABORTED,
    ABORTING,
    CANCEL_UNACKED,
    STAGED,
    SUCCEEDED,
    Rollout,
    RolloutSummary,
)
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from protocol.messages import JobState


@pytest.fixture
def harness(tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet) -> ControllerHarness:
    return ControllerHarness(tmp_path / "controller.db", mosquitto.url, keys.operator)


@pytest.fixture
def harness_db(db: str, mosquitto: LocalMosquitto, keys: KeySet) -> ControllerHarness:
    """The controller on SQLite, then on PostgreSQL (the `db` fixture)."""
    return ControllerHarness(db, mosquitto.url, keys.operator)


def staged(
    harness: ControllerHarness, fleet: SimFleet, version: str = "2.0.0", **kw: object
) -> Rollout:
    """A --stage rollout of `version` over the whole fleet, driven until it rests `staged`."""
    harness.sync()
    rid = harness.create(
        sorted(fleet.devices), waves_spec="1,100%", stage=True, version=version, **kw
    )
    result = harness.drive(rid)
    assert result.state == STAGED, result
    return result  # type: ignore[no-any-return]


def shown(summary: RolloutSummary) -> str:
    """`rollout status` as the operator reads it."""
    console = Console(record=True, width=400)
    console.print(render(summary))
    return console.export_text()


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
        # The rest never got an `activate`: each staged job got a signed cancel instead,
        # and the abort ended once each robot had answered it.
        rest = ("robot-0001", "robot-0002")
        assert all(a[d].ac_command_id is None and a[d].cx_command_id for d in rest)
        assert [a[d].state for d in rest] == ["CANCELED", "CANCELED"]
        assert all(fleet.devices[d].progress[a[d].command_id or ""] is JobState.CANCELED
                   for d in rest)  # fmt: skip
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


def test_an_aborted_staged_rollout_ends_once_every_staged_robot_has_canceled(
    mosquitto: LocalMosquitto, keys: KeySet, harness_db: ControllerHarness, counter: CommandCounter
) -> None:
    harness = harness_db
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)) as fleet:
        r = staged(harness, fleet)
        assert harness.store.request_abort(r.id, "aborted by the operator", True)
        final = harness.drive(r.id)  # what `rollout abort` hands its driver
        assert final.state == ABORTED
        a = harness.store.assignments(r.id)
        assert [(x.state, x.code) for x in a] == [("CANCELED", "canceled")] * 3, a
        # Each robot's own staged job ended CANCELED; the old engine never stopped serving.
        assert all(fleet.devices[x.device_id].progress[x.command_id or ""] is JobState.CANCELED
                   for x in a)  # fmt: skip
        assert {d.models["detector"]["active"] for d in fleet.devices.values()} == {"1.0.0"}
        summary = harness.store.summary(r.id)
        assert (summary.staged, summary.cancels_pending, summary.failed) == ([], [], 0)
        # One deploy and one cancel per robot, nothing else.
        wait_until(lambda: len(counter.arrivals) == 6, what="six commands")
        kinds = {d: sorted(m.split(":")[0] for m in ms) for d, ms in counter.per_device().items()}
        assert kinds == {d: ["cancel", "deploy"] for d in fleet.devices}


def test_a_robot_offline_during_the_abort_ends_timed_out_after_the_wave_timeout_and_is_listed(
    mosquitto: LocalMosquitto, keys: KeySet, harness_db: ControllerHarness
) -> None:
    harness, away, timeout = harness_db, "robot-0002", 2.0
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)) as fleet:
        r = staged(harness, fleet, wave_timeout=timeout)
        fleet.disconnect_device(away)

        def gone() -> bool:
            harness.sync()
            record = harness.registry.get(away)
            return record is not None and not record.online

        wait_until(gone, what="its will")
        assert harness.store.request_abort(r.id, "aborted by the operator", True)
        driver = harness.driver(r.id)
        ended: list[Rollout] = []
        thread = threading.Thread(target=lambda: ended.append(driver.run()))
        started = time.monotonic()
        thread.start()

        def waiting_for_away_only() -> bool:
            s = harness.store.summary(r.id)
            canceled = [a for a in harness.store.assignments(r.id) if a.state == "CANCELED"]
            return (s.rollout.state, s.cancels_pending, len(canceled)) == (ABORTING, [away], 2)

        wait_until(waiting_for_away_only, what="the online robots' cancels")
        assert f"cancel pending, the staged engine still on the robot (the abort waits up to " \
            f"--wave-timeout): {away}" in shown(harness.store.summary(r.id))  # fmt: skip
        thread.join(timeout + 10)
        took = time.monotonic() - started
        assert ended and ended[0].state == ABORTED
        assert took >= timeout, took  # it waited the wave timeout for the offline robot
        a = harness.store.assignment(r.id, away)
        assert a is not None and (a.state, a.code) == ("TIMED_OUT", CANCEL_UNACKED)
        assert a.reason and a.reason.startswith(
            f"cancel not acknowledged within the wave timeout of {timeout:g}s: offline since "
        ), a.reason
        summary = harness.store.summary(r.id)
        assert summary.cancels_unacknowledged == [{"device_id": away, "wave": a.wave,
                                                   "reason": a.reason}]  # fmt: skip
        assert (summary.cancels_pending, summary.failed) == ([], 0)  # it staged: no failure
        assert f"{away}: may still hold the staged engine: {a.reason}" in shown(summary)
        # Back online, the robot finds the cancel in its session and ends the staged job.
        fleet.connect_device(away)
        wait_until(lambda: fleet.devices[away].progress.get(a.command_id or "")
                   is JobState.CANCELED, what="the queued cancel")  # fmt: skip
        assert fleet.devices[away].models["detector"]["active"] == "1.0.0"


def test_a_robot_whose_staged_job_already_expired_answers_the_abort_and_is_not_waited_for(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)) as fleet:
        r = staged(harness, fleet)  # wave timeout 30 s
        gone = harness.store.assignment(r.id, "robot-0001")
        assert gone is not None and gone.command_id
        # Its stage_ttl_s ended the job while no driver listened: nothing reported it.
        fleet.devices["robot-0001"].progress[gone.command_id] = JobState.CANCELED
        assert harness.store.request_abort(r.id, "aborted by the operator", True)
        t0 = time.monotonic()
        assert harness.drive(r.id).state == ABORTED
        assert time.monotonic() - t0 < 10  # its refused cancel answered: no wave timeout
        a = harness.store.assignment(r.id, "robot-0001")
        assert a is not None and (a.state, a.code) == ("CANCELED", "not_cancelable")
        assert (a.reason or "").startswith("its staged job had already ended on the robot: ")
        assert harness.store.summary(r.id).cancels_unacknowledged == []


def test_a_driver_killed_mid_activation_is_resumed_with_one_activate_per_robot(
    tmp_path: Path,
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    counter: CommandCounter,
) -> None:
    harness = ControllerHarness(env["JETFLEET_DB"], mosquitto.url, keys.operator)
    log = tmp_path / "activate.log"
    with SimFleet(mosquitto.url, keys.trust, make_devices(4)) as fleet:
        r = staged(harness, fleet)
        for d in fleet.devices.values():
            d.behaviour.step_s = 0.3  # the canary's switch takes ~1 s: time to kill mid-way
        with log.open("wb") as out:
            driver = subprocess.Popen(
                jetfleet_cmd("rollout", "activate", r.id, "--waves", "1,100%", "--wait"),
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        canary = "robot-0000"

        def canary_activated() -> bool:
            a = harness.store.assignment(r.id, canary)
            return driver.poll() is not None or bool(a and a.ac_published_at)

        try:
            wait_until(canary_activated, timeout=30, what="the canary's activate")
        finally:
            alive = driver.poll() is None
            driver.send_signal(signal.SIGKILL)  # kill -9: no lease given up, no session ended
            driver.wait(10)
        assert alive, log.read_text()
        activated = [a.device_id for a in harness.store.assignments(r.id) if a.ac_command_id]
        assert activated == [canary]  # killed in the activation's first wave
        # `rollout resume` on this host: the dead driver's lease is taken at once.
        final = harness.drive(r.id)
        assert final.state == SUCCEEDED, final.abort_reason
        assert {a.state for a in harness.store.assignments(r.id)} == {"SUCCEEDED"}
        assert {d.models["detector"]["active"] for d in fleet.devices.values()} == {"2.0.0"}
        # One deploy and one activate sent to each robot, each acted on once.
        wait_until(lambda: len(counter.arrivals) == 8, what="eight commands")
        kinds = {d: sorted(m.split(":")[0] for m in ms) for d, ms in counter.per_device().items()}
        assert kinds == {d: ["activate", "deploy"] for d in fleet.devices}
        acted = {d.device_id: sorted(c.kind.value for c in d.commands.values())
                 for d in fleet.devices.values()}  # fmt: skip
        assert acted == {d: ["activate", "deploy"] for d in fleet.devices}
