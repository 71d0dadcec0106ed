"""The rollout engine against a real Mosquitto and simulated devices that speak the real
protocol (signed commands verified, real events and retained status)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fleet import Behaviour, CommandCounter, ControllerHarness, SimFleet, make_devices, wait_until
from rich.console import Console

from controller.cli.common import render
from controller.rollouts.policy import RolloutPolicy
from controller.rollouts.store import ABORTED, PENDING, SUCCEEDED, DevicesHeldError
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from protocol.messages import JobState


@pytest.fixture
def harness(tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet) -> ControllerHarness:
    return ControllerHarness(tmp_path / "controller.db", mosquitto.url, keys.operator)


def fleet_of(mosquitto: LocalMosquitto, keys: KeySet, n: int, **kw: object) -> SimFleet:
    return SimFleet(mosquitto.url, keys.trust, make_devices(n, **kw))  # type: ignore[arg-type]


@contextmanager
def driving(harness: ControllerHarness, rid: str) -> Iterator[tuple[str, threading.Thread]]:
    """The rollout's driver on a thread of its own until the block ends; yields the first
    device's command id once it is sent, and the thread."""
    driver = harness.driver(rid)
    t = threading.Thread(target=driver.run)
    t.start()
    try:
        wait_until(lambda: harness.store.assignments(rid)[0].command_id is not None)
        cid = harness.store.assignments(rid)[0].command_id
        assert cid is not None
        yield cid, t
    finally:
        driver.stop.set()
        t.join(5)


def test_failing_canary_aborts_and_the_other_devices_never_get_a_command(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 3) as fleet:
        fleet.devices["robot-0002"].behaviour = Behaviour(outcome=JobState.ROLLED_BACK)
        assert harness.sync() == 3
        rid = harness.create(sorted(fleet.devices), canary="robot-0002")
        result = harness.drive(rid)
        assert result.state == ABORTED
        assert "failure rate 100%" in (result.abort_reason or "")
        summary = harness.store.summary(rid)
        assert summary.failures[0]["device_id"] == "robot-0002"
        assert summary.failures[0]["code"] == "latency_regression"
        assert [w.state for w in summary.waves] == ["done", "skipped"]
        wait_until(lambda: "robot-0002" in counter.per_device(), what="the canary's command")
        seen = counter.per_device()
        assert set(seen) == {"robot-0002"}, seen
        assert fleet.devices["robot-0000"].commands_received == 0
        assert fleet.devices["robot-0001"].commands_received == 0
        # Nothing succeeded, so there is nothing to roll back.
        assert summary.rollbacks == {}


def test_threshold_that_tolerates_one_failure_completes_with_one_rolled_back(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 3) as fleet:
        fleet.devices["robot-0002"].behaviour = Behaviour(outcome=JobState.ROLLED_BACK)
        harness.sync()
        rid = harness.create(sorted(fleet.devices), max_failure_rate=0.34)
        assert harness.drive(rid).state == SUCCEEDED
        states = {a.device_id: a.state for a in harness.store.assignments(rid)}
        assert states == {
            "robot-0000": "SUCCEEDED",
            "robot-0001": "SUCCEEDED",
            "robot-0002": "ROLLED_BACK",
        }
        assert fleet.devices["robot-0000"].models["detector"]["active"] == "2.0.0"
        assert fleet.devices["robot-0002"].models["detector"]["active"] == "1.0.0"


def test_a_device_that_gave_no_verdict_is_counted_apart_not_as_a_failure(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 3) as fleet:
        fleet.devices["robot-0002"].behaviour = Behaviour(
            outcome=JobState.FAILED,
            code="not_judged",
            reason="no engine stays active: not judged: clocks moved in each of 2 speed runs",
        )
        harness.sync()
        rid = harness.create(sorted(fleet.devices))  # --max-failure-rate 0.05: 1 of 3 aborts
        assert harness.drive(rid).state == SUCCEEDED
        summary = harness.store.summary(rid)
        assert (summary.failed, summary.failure_rate, summary.failures) == (0, 0.0, [])
        assert summary.not_judged == [
            {
                "device_id": "robot-0002",
                "wave": 1,
                "reason": fleet.devices["robot-0002"].behaviour.reason,
            }
        ]
        assert summary.to_dict()["not_judged"] == summary.not_judged
        console = Console(record=True, width=200)
        console.print(render(summary))
        assert (
            "not judged (device conditions moved, no verdict on the model; not counted as "
            "failures, deploy again): robot-0002" in console.export_text()
        )


def test_abort_in_the_second_wave_rolls_the_first_wave_back_to_the_old_version(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 4) as fleet:
        for d in ("robot-0002", "robot-0003"):
            fleet.devices[d].behaviour = Behaviour(
                outcome=JobState.FAILED, code="build_failed", reason="TensorRT ran out of workspace"
            )
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="2,100%", max_failure_rate=0.25)
        result = harness.drive(rid)
        assert result.state == ABORTED
        assigned = {a.device_id: a for a in harness.store.assignments(rid)}
        for d in ("robot-0000", "robot-0001"):
            assert assigned[d].state == "SUCCEEDED"
            assert assigned[d].rb_state == "SUCCEEDED"
            assert assigned[d].rb_to_version == "1.0.0"
            assert fleet.devices[d].models["detector"]["active"] == "1.0.0"
        # The registry follows the devices' retained status: the old version is back.
        harness.sync()
        for d in ("robot-0000", "robot-0001"):
            rec = harness.registry.get(d)
            assert rec is not None and rec.active_version("detector") == "1.0.0"
        assert assigned["robot-0002"].rb_command_id is None
        kinds = counter.per_device()
        assert [k.split(":")[0] for k in kinds["robot-0000"]] == ["deploy", "rollback"]
        assert [k.split(":")[0] for k in kinds["robot-0002"]] == ["deploy"]


def test_a_device_that_never_answers_times_out_with_its_wave(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 2) as fleet:
        fleet.devices["robot-0001"].behaviour = Behaviour(silent=True)
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices), waves_spec="100%", wave_timeout=1.5, max_failure_rate=0.5
        )
        assert harness.drive(rid).state == SUCCEEDED
        a = {a.device_id: a for a in harness.store.assignments(rid)}
        assert a["robot-0001"].state == "TIMED_OUT"
        assert "wave timeout of 1.5s" in (a["robot-0001"].reason or "")
        assert a["robot-0000"].state == "SUCCEEDED"


def test_offline_device_gets_its_command_from_the_broker_when_it_returns(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 2) as fleet:
        fleet.disconnect_device("robot-0001")
        harness.sync()
        wait_until(
            lambda: harness.sync() >= 0 and not harness.registry.get("robot-0001").online,  # type: ignore[union-attr]
            what="the will message",
        )
        rid = harness.create(sorted(fleet.devices), waves_spec="100%", wave_timeout=20)
        driver = harness.driver(rid)
        import threading

        t = threading.Thread(target=driver.run)
        t.start()
        try:
            wait_until(
                lambda: (
                    {a.device_id: a.state for a in harness.store.assignments(rid)}["robot-0000"]
                    == "SUCCEEDED"
                ),
                what="the online device",
            )
            pending = {a.device_id: a.state for a in harness.store.assignments(rid)}
            assert pending["robot-0001"] == PENDING
            assert harness.store.summary(rid).offline_pending == ["robot-0001"]
            fleet.connect_device("robot-0001")
            t.join(20)
            assert not t.is_alive()
        finally:
            driver.stop.set()
            t.join(5)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
        assert fleet.devices["robot-0001"].models["detector"]["active"] == "2.0.0"


def test_events_that_lie_about_their_device_or_are_garbage_do_not_move_the_rollout(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    import subprocess

    with fleet_of(mosquitto, keys, 1, step_s=0.2) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="100%")
        with driving(harness, rid) as (cid, t):
            pub = ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-q", "1"]
            forged = json.dumps(
                {
                    "schema": "jetfleet.event/v1",
                    "command_id": cid,
                    "device_id": "robot-9999",
                    "state": "FAILED",
                    "seq": 99,
                    "reason": "x",
                    "code": "internal",
                }
            )
            subprocess.run(
                [*pub, "-t", "jetfleet/v1/devices/robot-9999/events", "-m", forged], check=True
            )
            subprocess.run(
                [*pub, "-t", "jetfleet/v1/devices/robot-0000/events", "-m", "{oops"], check=True
            )
            t.join(20)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
        assert harness.store.assignments(rid)[0].state == "SUCCEEDED"


def test_paused_rollout_starts_no_wave_until_resumed(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    import threading
    import time

    from controller.rollouts.driver import pause, resume_state

    with fleet_of(mosquitto, keys, 2) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices))
        assert pause(harness.store, rid)
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:
            time.sleep(1.0)
            assert counter.per_device() == {}
            assert [w.state for w in harness.store.waves(rid)] == ["pending", "pending"]
            assert resume_state(harness.store, rid)
            t.join(20)
            assert not t.is_alive()
        finally:
            driver.stop.set()
            t.join(5)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]


def test_resume_after_a_crash_between_recording_and_publishing_sends_the_recorded_command(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    import time

    with fleet_of(mosquitto, keys, 2) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="100%")
        # What a controller killed mid-`_command_wave` leaves: the wave running, one
        # command signed and stored, never published; the other device not yet signed.
        harness.store.start_wave(rid, 0, time.time() + 30)
        r = harness.store.get(rid)
        assert r is not None
        signed = harness.signer.deploy(
            "robot-0000",
            url=r.bundle_url or "",
            rollout_id=rid,
            sha256=r.bundle_sha256 or "",
            size=r.bundle_size or 1,
            name=r.model,
            version=r.version,
        )
        assert harness.store.record_command(rid, "robot-0000", signed.command_id, signed.envelope)
        assert harness.drive(rid).state == SUCCEEDED
        wait_until(lambda: len(counter.per_device()) == 2)
        seen = counter.per_device()
        assert seen["robot-0000"] == [f"deploy:{signed.command_id}"]
        assert len(seen["robot-0001"]) == 1
        # Recording twice is refused: an assigned device never gets a second command.
        assert not harness.store.record_command(rid, "robot-0000", "other-id", b"{}")


def test_rollout_over_mqtt_3_1_1_completes_and_resumes_from_its_persistent_session(
    tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet
) -> None:
    import threading

    harness = ControllerHarness(tmp_path / "c311.db", mosquitto.url, keys.operator, "3.1.1")
    with fleet_of(mosquitto, keys, 3, step_s=0.15) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="100%")
        first = harness.driver(rid)
        t = threading.Thread(target=first.run)
        t.start()
        # Stop the first driver as soon as its commands are out: the devices' events then
        # wait in the controller's clean_session=false session for the next driver.
        wait_until(lambda: all(a.published_at for a in harness.store.assignments(rid)))
        first.stop.set()
        t.join(10)
        wait_until(
            lambda: all(d.job and d.job["state"] == "SUCCEEDED" for d in fleet.devices.values()),
            timeout=20,
        )
        assert harness.drive(rid).state == SUCCEEDED
        assert {a.state for a in harness.store.assignments(rid)} == {"SUCCEEDED"}
        assert all(d.commands_received == 1 for d in fleet.devices.values())
        # Events are not retained: these reached the second driver only through the
        # broker's queue for the persistent session.
        finals = {e["device_id"] for e in harness.store.events(rid) if e["state"] == "SUCCEEDED"}
        assert finals == set(fleet.devices)


def test_broker_restart_mid_wave_is_ridden_out_and_the_rollout_finishes(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    import threading
    import time

    with fleet_of(mosquitto, keys, 2, step_s=0.3) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="100%", wave_timeout=60)
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:
            wait_until(lambda: all(a.published_at for a in harness.store.assignments(rid)))
            mosquitto.stop()  # persistence keeps every session and its queued messages
            time.sleep(1.0)
            mosquitto.start()
            t.join(45)
            assert not t.is_alive(), harness.store.summary(rid).to_dict()
        finally:
            driver.stop.set()
            t.join(5)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
        assert all(d.commands_received == 1 for d in fleet.devices.values())


def test_resume_after_the_wave_deadline_counts_results_queued_while_the_controller_was_dead(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    import threading
    import time

    with fleet_of(mosquitto, keys, 30, step_s=0.05) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="100%", wave_timeout=2.0)
        first = harness.driver(rid)
        t = threading.Thread(target=first.run)
        t.start()
        wait_until(lambda: all(a.published_at for a in harness.store.assignments(rid)))
        first.stop.set()
        t.join(10)
        deadline = harness.store.waves(rid)[0].deadline or 0
        time.sleep(max(0.0, deadline - time.time()) + 0.5)  # the controller "was dead"
        assert harness.drive(rid).state == SUCCEEDED
        assert {a.state for a in harness.store.assignments(rid)} == {"SUCCEEDED"}


@pytest.mark.serial  # asserts a wall-clock bound
def test_operator_abort_cancels_in_flight_jobs_instead_of_waiting_for_the_wave(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    import threading
    import time

    with fleet_of(mosquitto, keys, 3, step_s=1.0) as fleet:  # a deploy takes 8 s here
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="100%", wave_timeout=120)
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:
            wait_until(lambda: all(d.progress for d in fleet.devices.values()), timeout=10)
            asked = time.monotonic()
            assert harness.store.request_abort(rid, "aborted by the operator", rollback=True)
            t.join(20)
            assert not t.is_alive()
            assert time.monotonic() - asked < 5, "the abort waited for the wave"
        finally:
            driver.stop.set()
            t.join(5)
        r = harness.store.get(rid)
        assert r is not None and r.state == ABORTED
        assert {a.state for a in harness.store.assignments(rid)} == {"CANCELED"}
        assert all(d.models["detector"]["active"] == "1.0.0" for d in fleet.devices.values())
        kinds = {dev: [c.split(":")[0] for c in cmds] for dev, cmds in counter.per_device().items()}
        assert kinds == {d: ["deploy", "cancel"] for d in fleet.devices}


def test_devices_are_held_until_terminal_in_an_unfinished_rollout_and_force_overrides(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 3) as fleet:
        fleet.devices["robot-0001"].behaviour = Behaviour(silent=True)
        harness.sync()
        first = harness.create(["robot-0000", "robot-0001"], waves_spec="100%", wave_timeout=30)
        driver = harness.driver(first)
        import threading

        t = threading.Thread(target=driver.run)
        t.start()
        try:
            wait_until(
                lambda: harness.store.assignment(first, "robot-0000").state == "SUCCEEDED",  # type: ignore[union-attr]
                what="robot-0000 to finish",
            )
            # robot-0001 hangs: still driven by the running rollout; robot-0000 is free.
            with pytest.raises(DevicesHeldError) as e:
                harness.create(sorted(fleet.devices), version="3.0.0")
            assert e.value.holders == {"robot-0001": first}
            assert f"robot-0001 (rollout {first})" in str(e.value)
            assert len(harness.store.recent()) == 1
            harness.create(["robot-0000", "robot-0002"], version="3.0.0")
            forced = harness.create(["robot-0001"], version="3.0.0", force=True)
            assert harness.store.get(forced) is not None
        finally:
            driver.stop.set()
            t.join(10)
        # Finished (aborted) rollouts hold nothing.
        harness.store.set_state(first, ABORTED)
        assert harness.store.holders(["robot-0001"]) == {"robot-0001": forced}
        harness.store.set_state(forced, ABORTED)
        assert harness.store.holders(["robot-0001"]) == {}


def test_abort_cancels_timed_out_devices_so_one_that_returns_never_installs_the_version(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 2, step_s=0.2) as fleet:
        fleet.devices["robot-0000"].behaviour = Behaviour(
            outcome=JobState.FAILED, step_s=0.2, code="build_failed", reason="out of workspace"
        )
        fleet.disconnect_device("robot-0001")
        wait_until(
            lambda: harness.sync() >= 0 and not harness.registry.get("robot-0001").online,  # type: ignore[union-attr]
            what="the will message",
        )
        # --offline fail: the absent robot counts as TIMED_OUT (the default leaves it to
        # the release; either way its queued deploy gets a cancel behind it).
        rid = harness.create(
            sorted(fleet.devices),
            waves_spec="100%",
            wave_timeout=3.0,
            policy=RolloutPolicy(offline="fail"),
        )
        result = harness.drive(rid)
        assert result.state == ABORTED
        a = {x.device_id: x for x in harness.store.assignments(rid)}
        assert a["robot-0001"].state == "TIMED_OUT"
        # Timed out with no word from the device: it gets a cancel, published.
        assert a["robot-0001"].cx_command_id and a["robot-0001"].cx_published_at
        # The device that reported its own terminal state needs none.
        assert a["robot-0000"].state == "FAILED" and a["robot-0000"].cx_command_id is None

        fleet.connect_device("robot-0001")  # back: deploy and cancel wait in its session
        back = fleet.devices["robot-0001"]
        deploy_id = a["robot-0001"].command_id
        wait_until(
            lambda: back.progress.get(deploy_id or "") is JobState.CANCELED,
            what="the returning device to cancel the deploy",
        )
        assert back.models["detector"]["active"] == "1.0.0"
        assert "2.0.0" not in back.installed["detector"]
        kinds = {dev: [c.split(":")[0] for c in cmds] for dev, cmds in counter.per_device().items()}
        assert kinds == {"robot-0000": ["deploy"], "robot-0001": ["deploy", "cancel"]}


def test_a_device_busy_with_a_foreign_job_is_still_settled_from_the_version_its_status_shows(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    """Its events were lost, and its retained status names a job in flight that is none of
    this rollout's (a cancel, a ping): the version it runs still settles the deploy."""
    import subprocess
    import threading
    import uuid

    from protocol.messages import DeviceStatus

    with fleet_of(mosquitto, keys, 1) as fleet:
        fleet.devices["robot-0000"].behaviour = Behaviour(silent=True)
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="100%", wave_timeout=20)
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:
            wait_until(lambda: harness.store.assignments(rid)[0].published_at is not None)
            status = DeviceStatus.new(
                device_id="robot-0000",
                online=True,
                models={"detector": {"active": "2.0.0", "previous": "1.0.0"}},
                job={"command_id": str(uuid.uuid4()), "state": "RECEIVED", "kind": "cancel"},
            )
            subprocess.run(
                ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-q", "1",
                 "-r", "-t", "jetfleet/v1/devices/robot-0000/status", "-m", status.encode()],
                check=True,
            )  # fmt: skip
            t.join(10)
            assert not t.is_alive(), "the rollout waited for its wave timeout"
        finally:
            driver.stop.set()
            t.join(5)
        (a,) = harness.store.assignments(rid)
        assert a.state == "SUCCEEDED" and "inferred from the device's status" in (a.reason or "")
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]


# One robot's burst: repeats, late older steps and a status in the middle.
BURST = [
    (1, "RECEIVED"), (2, "DOWNLOADING"), (1, "RECEIVED"), (3, "BUILDING"), (0, "status"),
    (4, "VALIDATING"), (2, "DOWNLOADING"), (5, "ACTIVATING"), (6, "PROBATION"),
    (7, "SUCCEEDED"), (5, "ACTIVATING"),
]  # fmt: skip


def publish_burst(mosquitto: LocalMosquitto, device: str, cid: str) -> None:
    """BURST on one connection, every message acknowledged by the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    sent = []
    for seq, state in BURST:
        if state == "status":
            topic, body = f"jetfleet/v1/devices/{device}/status", {
                "schema": "jetfleet.status/v1", "device_id": device, "online": True,
            }  # fmt: skip
        else:
            topic, body = f"jetfleet/v1/devices/{device}/events", {
                "schema": "jetfleet.event/v1", "command_id": cid, "device_id": device,
                "state": state, "seq": seq,
            }  # fmt: skip
        sent.append(client.publish(topic, json.dumps(body), qos=1))
    for info in sent:
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    client.loop_stop()
    client.disconnect()


def assert_burst_settled(harness: ControllerHarness, rid: str) -> None:
    assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
    assert harness.store.assignments(rid)[0].state == "SUCCEEDED"
    logged = [(e["seq"], e["state"]) for e in harness.store.events(rid)]
    assert logged == [(s, st) for s, st in dict.fromkeys(BURST) if st != "status"]
    device = harness.registry.get("robot-x")
    assert device is not None and device.online
    assert (device.last_seq, device.job["state"]) == (7, "SUCCEEDED")  # type: ignore[index]


def test_a_burst_of_one_robots_events_with_repeats_and_late_ones_settles_in_arrival_order(
    mosquitto: LocalMosquitto, keys: KeySet, db: str
) -> None:
    """Events that arrive together are applied as one run (two statements for all); a
    repeat or a late older step inside it must not move the job back, and a status in
    the middle is applied in its place."""
    harness = ControllerHarness(db, mosquitto.url, keys.operator)
    rid = harness.create(["robot-x"], waves_spec="100%")
    with driving(harness, rid) as (cid, t):
        publish_burst(mosquitto, "robot-x", cid)
        t.join(20)
    assert_burst_settled(harness, rid)


def test_a_run_of_events_that_trips_a_bug_is_applied_message_by_message(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    tripped = []

    def broken(*_: object, **__: object) -> None:
        tripped.append(1)
        raise RuntimeError("a bug in the batch path")

    monkeypatch.setattr(harness.registry, "apply_events", broken)
    rid = harness.create(["robot-x"], waves_spec="100%")
    with driving(harness, rid) as (cid, t):
        publish_burst(mosquitto, "robot-x", cid)
        t.join(20)
    assert tripped  # the events did come as runs
    assert_burst_settled(harness, rid)
