"""Rollout policy (issue 14) against the rollout engine, a real Mosquitto and simulated
devices speaking the real protocol: per-type abort criteria, --min-finished,
--max-per-minute, exponential waves, a scheduled start, and the stored policy read back
from a controller.db created before policies existed."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from fleet import Behaviour, CommandCounter, ControllerHarness, SimFleet, make_devices, wait_until

from controller.rollouts.driver import WaveSpecError, parse_waves, plan_waves
from controller.rollouts.policy import (
    PolicyError,
    RolloutPolicy,
    Tally,
    abort_reason,
    make_policy,
    parse_abort_on,
)
from controller.rollouts.store import ABORTED, SCHEDULED, SUCCEEDED, RolloutStore
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from protocol.messages import JobState


@pytest.fixture
def harness(tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet) -> ControllerHarness:
    return ControllerHarness(tmp_path / "controller.db", mosquitto.url, keys.operator)


def fleet_of(mosquitto: LocalMosquitto, keys: KeySet, n: int, **kw: object) -> SimFleet:
    return SimFleet(mosquitto.url, keys.trust, make_devices(n, **kw))  # type: ignore[arg-type]


def policy(**kw: object) -> RolloutPolicy:
    return make_policy(now=time.time(), **kw)  # type: ignore[arg-type]


# -- parsing and judging (pure) ----------------------------------------------------------
def test_abort_on_takes_a_threshold_per_type_or_for_types_together() -> None:
    crit = parse_abort_on("ROLLED_BACK>5%, timed_out>20%,FAILED+REJECTED>10%")
    assert [(c.types, c.threshold) for c in crit] == [
        (("ROLLED_BACK",), 0.05),
        (("TIMED_OUT",), 0.2),
        (("FAILED", "REJECTED"), 0.1),
    ]
    assert parse_abort_on("ALL>10%")[0].types == ("FAILED", "REJECTED", "ROLLED_BACK", "TIMED_OUT")
    for bad, says in (
        ("ROLLED_BACK5%", "expected TYPE>N%"),
        ("CRASHED>5%", "CRASHED is not one of"),
        ("FAILED>x%", "is not a percentage"),
        ("FAILED>100%", "within 0%..100%"),
        ("FAILED>5", "expected TYPE>N%"),
    ):
        with pytest.raises(PolicyError, match=says):
            parse_abort_on(bad)


def test_pace_and_start_options_are_checked_with_one_line_reasons() -> None:
    with pytest.raises(PolicyError, match=r"--max-per-minute 0 is not within 1\.\.1000"):
        policy(max_per_minute=0)
    with pytest.raises(PolicyError, match="--min-finished must be 0 or more"):
        policy(min_finished=-1)
    with pytest.raises(PolicyError, match="--start-at 'tomorrow'"):
        policy(start_at="tomorrow")
    assert policy(start_at="2026-11-26T22:00:00Z").start_at == 1795730400.0
    assert policy(start_at="2026-11-26T22:00:00").start_at == 1795730400.0  # no zone: UTC
    before = time.time()
    at = policy(start_at="+30m").start_at
    assert at is not None and before + 1800 <= at <= time.time() + 1800


def test_the_policy_round_trips_through_its_stored_json() -> None:
    p = policy(abort_on="ROLLED_BACK>5%,FAILED+REJECTED>10%", min_finished=3, max_per_minute=60)
    assert RolloutPolicy.from_json(p.to_json()) == p
    assert RolloutPolicy.from_json(None) == RolloutPolicy()


def test_no_abort_decision_before_min_finished_then_the_type_that_crossed_is_named() -> None:
    p = policy(abort_on="ROLLED_BACK>30%,TIMED_OUT>10%", min_finished=3)
    one_canary_failed = Tally(commanded=1, finished=1, states={"ROLLED_BACK": 1})
    assert abort_reason(p, 1.0, one_canary_failed, total=10, wave=0) is None
    states = {"SUCCEEDED": 3, "ROLLED_BACK": 1, "TIMED_OUT": 1}
    tally = Tally(commanded=5, finished=5, states=states)
    assert abort_reason(p, 1.0, tally, total=10, wave=1) == (
        "TIMED_OUT 20% (1 of 5) crossed --abort-on TIMED_OUT>10% in wave 2"
    )
    # A target smaller than --min-finished is judged once all of it finished.
    assert abort_reason(p, 1.0, one_canary_failed, total=1, wave=0) is not None


def test_exponential_waves_double_until_the_target_is_covered() -> None:
    waves = plan_waves([f"r{i:02d}" for i in range(20)], parse_waves("exp:1x2", 20))
    assert [len(w) for w in waves] == [1, 2, 4, 8, 5]
    assert [len(w) for w in plan_waves(["a", "b", "c"], parse_waves("exp:2x3", 3))] == [2, 1]
    for bad in ("exp:0x2", "exp:1x0.5", "exp:1", "exp:ax2"):
        with pytest.raises(WaveSpecError, match="--waves"):
            parse_waves(bad, 10)


# -- the engine ---------------------------------------------------------------------------
def test_min_finished_keeps_one_early_canary_failure_from_aborting(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 5) as fleet:
        fleet.devices["robot-0000"].behaviour = Behaviour(outcome=JobState.ROLLED_BACK)
        harness.sync()
        # Without --min-finished the canary alone is 100% and aborts (the default test).
        rid = harness.create(
            sorted(fleet.devices),
            max_failure_rate=0.25,
            policy=policy(min_finished=3),
        )
        assert harness.drive(rid).state == SUCCEEDED
        states = [a.state for a in harness.store.assignments(rid)]
        assert states == ["ROLLED_BACK"] + ["SUCCEEDED"] * 4


def test_per_type_threshold_aborts_on_the_type_that_crossed_and_rolls_back(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 5) as fleet:
        fleet.devices["robot-0003"].behaviour = Behaviour(outcome=JobState.REJECTED)
        fleet.devices["robot-0004"].behaviour = Behaviour(
            outcome=JobState.FAILED, code="build_failed", reason="TensorRT ran out of workspace"
        )
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices),
            waves_spec="3,100%",
            max_failure_rate=1.0,  # the overall rate alone would never abort
            policy=policy(abort_on="REJECTED>30%,FAILED>10%"),
        )
        result = harness.drive(rid)
        assert result.state == ABORTED
        assert result.abort_reason == (
            "FAILED 20% (1 of 5) crossed --abort-on FAILED>10% in wave 2"
        )
        for d in ("robot-0000", "robot-0001", "robot-0002"):
            assert fleet.devices[d].models["detector"]["active"] == "1.0.0"


def test_max_per_minute_never_releases_commands_faster_than_the_rate_across_waves(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 5) as fleet:
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices), waves_spec="2,100%", policy=policy(max_per_minute=150)
        )
        assert harness.drive(rid).state == SUCCEEDED
        wait_until(lambda: len(counter.arrivals) == 5, what="five commands at the broker")
        times = [t for t, _, kind in counter.arrivals if kind == "deploy"]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 150/min is one command every 0.4 s, measured where the devices get them.
        assert min(gaps) >= 0.35, gaps
        stored = sorted(a.commanded_at or 0 for a in harness.store.assignments(rid))
        assert all(b - a >= 0.4 - 1e-6 for a, b in itertools.pairwise(stored))
        assert [w.state for w in harness.store.waves(rid)] == ["done", "done"]


def test_pause_holds_back_a_paced_waves_remaining_commands(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    from controller.rollouts.driver import pause, resume_state

    with fleet_of(mosquitto, keys, 3) as fleet:
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices), waves_spec="100%", policy=policy(max_per_minute=60)
        )
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:
            wait_until(lambda: len(counter.arrivals) == 1, what="the first command")
            assert pause(harness.store, rid)
            time.sleep(1.5)
            assert len(counter.arrivals) == 1
            assert resume_state(harness.store, rid)
            t.join(20)
            assert not t.is_alive()
        finally:
            driver.stop.set()
            t.join(5)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
        assert len(counter.arrivals) == 3


def test_exponential_waves_run_one_two_four(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 7) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices), waves_spec="exp:1x2")
        assert harness.drive(rid).state == SUCCEEDED
        waves = harness.store.waves(rid)
        assert [(w.size, w.state) for w in waves] == [(1, "done"), (2, "done"), (4, "done")]
        # Each wave starts only after the one before it ended.
        for before, after in itertools.pairwise(waves):
            assert (after.started_at or 0) >= (before.ended_at or 0)


def test_scheduled_rollout_is_stored_scheduled_and_sends_nothing_before_its_start(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 2) as fleet:
        harness.sync()
        start = time.time() + 1.5
        rid = harness.create(sorted(fleet.devices), policy=RolloutPolicy(start_at=start))
        assert harness.store.get(rid).state == SCHEDULED  # type: ignore[union-attr]
        # A scheduled rollout already holds its devices.
        assert set(harness.store.holders(sorted(fleet.devices)).values()) == {rid}
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:
            time.sleep(0.8)
            assert counter.arrivals == []
            assert harness.store.get(rid).state == SCHEDULED  # type: ignore[union-attr]
            t.join(20)
            assert not t.is_alive()
        finally:
            driver.stop.set()
            t.join(5)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
        first = min(a.commanded_at or 0 for a in harness.store.assignments(rid))
        assert first >= start


def test_a_controller_db_from_before_policies_gets_the_columns_and_the_default_policy(
    tmp_path: Path, harness: ControllerHarness
) -> None:
    rid = harness.create(["robot-0000"])
    db = tmp_path / "controller.db"
    harness.registry.conn.close()
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE rollouts DROP COLUMN policy")
    for column in ("commanded_at", "attempts", "retry_at"):
        conn.execute(f"ALTER TABLE assignments DROP COLUMN {column}")
    conn.execute("DROP TABLE schema_version")  # written before schema versions
    conn.commit()
    conn.row_factory = sqlite3.Row
    store = RolloutStore(conn)
    cols = {r[1] for r in conn.execute("PRAGMA table_info(rollouts)")}
    assert "policy" in cols
    old = store.get(rid)
    assert old is not None and old.policy == RolloutPolicy()
    a = store.assignments(rid)[0]
    assert (a.commanded_at, a.attempts, a.retry_at) == (None, 0, None)
    conn.close()


def test_a_scheduled_rollout_aborted_before_its_start_sends_nothing(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 2) as fleet:
        harness.sync()
        rid = harness.create(sorted(fleet.devices), policy=RolloutPolicy(start_at=time.time() + 60))
        assert harness.store.request_abort(rid, "aborted by the operator", rollback=True)
        result = harness.drive(rid)
        assert result.state == ABORTED
        assert [w.state for w in harness.store.waves(rid)] == ["skipped", "skipped"]
        time.sleep(0.3)
        assert counter.arrivals == []
        assert harness.store.holders(sorted(fleet.devices)) == {}


def test_approve_waves_waits_after_each_wave_until_promoted(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    from controller.rollouts.driver import promote
    from controller.rollouts.store import WAITING_APPROVAL

    with fleet_of(mosquitto, keys, 3) as fleet:
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices), waves_spec="1,2,100%", policy=RolloutPolicy(approve_waves=True)
        )
        assert not promote(harness.store, rid)  # running: nothing to approve
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:
            for wave in (1, 2):

                def waiting() -> bool:
                    return harness.store.get(rid).state == WAITING_APPROVAL  # type: ignore[union-attr]

                wait_until(waiting, what=f"approval after wave {wave}")
                time.sleep(0.5)
                assert len(counter.arrivals) == wave
                assert promote(harness.store, rid)
            t.join(20)
            assert not t.is_alive()
        finally:
            driver.stop.set()
            t.join(5)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
        assert len(counter.arrivals) == 3


def test_device_timeout_cancels_a_device_stuck_in_one_state_before_the_wave_deadline(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 2) as fleet:
        fleet.devices["robot-0001"].behaviour = Behaviour(step_s=30)  # hangs after RECEIVED
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices),
            waves_spec="100%",
            wave_timeout=60,
            max_failure_rate=1.0,
            policy=policy(device_timeout=1.0),
        )
        started = time.monotonic()
        assert harness.drive(rid).state == SUCCEEDED
        assert time.monotonic() - started < 15  # not the 60 s wave deadline
        a = {a.device_id: a for a in harness.store.assignments(rid)}
        assert a["robot-0000"].state == "SUCCEEDED"
        assert a["robot-0001"].state == "TIMED_OUT"
        assert a["robot-0001"].reason == "stuck in RECEIVED for more than 1s (--device-timeout)"
        wait_until(
            lambda: ("robot-0001", "cancel") in [(d, k) for _, d, k in counter.arrivals],
            what="the cancel of the stuck job",
        )
        wait_until(
            lambda: bool(fleet.devices["robot-0001"].canceled), what="the device canceling it"
        )
        assert [k for _, d, k in counter.arrivals if d == "robot-0000"] == ["deploy"]


def test_retries_turn_a_transient_failure_into_a_success_and_it_never_counts_as_failed(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 2) as fleet:
        flaky = fleet.devices["robot-0001"]
        flaky.behaviour = Behaviour(
            outcome=JobState.FAILED, code="download_failed", reason="mirror unreachable"
        )
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices),
            waves_spec="100%",
            max_failure_rate=0.0,  # one counted failure would abort
            policy=policy(retries=2, retry_on="FAILED", retry_backoff=1.0),
        )
        driver = harness.driver(rid)
        t = threading.Thread(target=driver.run)
        t.start()
        try:

            def retry_waiting() -> bool:
                a = harness.store.assignment(rid, "robot-0001")
                return a is not None and a.attempts == 1 and a.command_id is None

            wait_until(retry_waiting, what="the retry scheduled")
            a = harness.store.assignment(rid, "robot-0001")
            assert a is not None and a.state == "WAITING"
            assert a.reason == "retry 1 of 2 after FAILED: mirror unreachable"
            flaky.behaviour = Behaviour()  # the mirror is back
            t.join(20)
            assert not t.is_alive()
        finally:
            driver.stop.set()
            t.join(5)
        assert harness.store.get(rid).state == SUCCEEDED  # type: ignore[union-attr]
        final = harness.store.assignment(rid, "robot-0001")
        assert final is not None and final.state == "SUCCEEDED" and final.attempts == 1
        deploys = [t for t, d, k in counter.arrivals if d == "robot-0001" and k == "deploy"]
        assert len(deploys) == 2 and deploys[1] - deploys[0] >= 0.9  # the back-off
        assert flaky.models["detector"]["active"] == "2.0.0"


def test_the_last_retry_failing_counts_as_the_failure(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness, counter: CommandCounter
) -> None:
    with fleet_of(mosquitto, keys, 1) as fleet:
        fleet.devices["robot-0000"].behaviour = Behaviour(
            outcome=JobState.FAILED, code="download_failed", reason="mirror unreachable"
        )
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices),
            waves_spec="100%",
            policy=policy(retries=2, retry_on="ALL", retry_backoff=0.2),
        )
        result = harness.drive(rid)
        assert result.state == ABORTED
        assert "failure rate 100% (1 of 1)" in (result.abort_reason or "")
        a = harness.store.assignment(rid, "robot-0000")
        assert a is not None and a.state == "FAILED" and a.attempts == 2
        wait_until(lambda: len(counter.arrivals) == 3, what="three deploys")


def test_a_device_on_hold_outlives_the_wave_and_device_timeouts_and_then_succeeds(
    mosquitto: LocalMosquitto, keys: KeySet, harness: ControllerHarness
) -> None:
    with fleet_of(mosquitto, keys, 2) as fleet:
        fleet.devices["robot-0001"].behaviour = Behaviour(hold_s=4.0)  # outside its window
        harness.sync()
        rid = harness.create(
            sorted(fleet.devices),
            waves_spec="100%",
            wave_timeout=1.5,
            max_failure_rate=0.0,
            policy=policy(device_timeout=1.0),
        )
        started = time.monotonic()
        assert harness.drive(rid).state == SUCCEEDED
        assert time.monotonic() - started >= 4.0  # it waited for the held device
        a = {a.device_id: a for a in harness.store.assignments(rid)}
        assert a["robot-0001"].state == "SUCCEEDED" and a["robot-0000"].state == "SUCCEEDED"
