"""`jetfleet rollout …` and `jetfleet rollback` as an operator runs them: subprocesses, a
real bundle, a real broker, simulated devices speaking the real protocol."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fleet import (
    Behaviour,
    CommandCounter,
    SimFleet,
    build_bundle,
    jetfleet_cmd,
    make_devices,
    run_cli,
    wait_until,
)

from controller.db import DB_ERRORS, DatabaseError, open_database
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from protocol.messages import JobState


def db_rows(env: dict[str, str], sql: str, *args: object) -> list[Any]:
    """Read the controller's database (SQLite or PostgreSQL) as a second process would
    (empty before it or its tables exist)."""
    try:
        conn = open_database(env["JETFLEET_DB"], readonly=True)
    except DatabaseError:  # no file yet
        return []
    try:
        return list(conn.execute(sql, args).fetchall())
    except DB_ERRORS:  # tables not created yet
        return []
    finally:
        conn.close()


# A canary slow enough (about 6 steps of this) that `rollout pause`, a new CLI process,
# lands while it deploys even on a loaded 2-core machine.
CANARY_STEP_S = 1.0


def start_and_pause_after_the_canary(env: dict[str, str], bundle: Path) -> str:
    """Start a `--waves 1,100%` rollout to all devices, pause it while the canary deploys,
    and return its id once the canary's wave is done (the second wave never starts)."""
    out = run_cli(
        env, "rollout", "start", str(bundle), "--target", "all", "--waves", "1,100%",
        "--output", "json",
    )  # fmt: skip
    rid: str = json.loads(out.stdout)["rollout"]["id"]

    def wave0(state: str) -> bool:
        return bool(db_rows(env, "SELECT state FROM waves WHERE idx=0")[0]["state"] == state)

    wait_until(lambda: wave0("running"), timeout=20)
    assert run_cli(env, "rollout", "pause", rid).returncode == 0
    wait_until(lambda: wave0("done"), timeout=20)
    return rid


def test_rollout_start_wait_json_deploys_every_device_from_the_published_bundle(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    tmp_path: Path,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)) as fleet:
        out = run_cli(
            env,
            "rollout",
            "start",
            str(bundle),
            "--target",
            "all",
            "--waves",
            "1,100%",
            "--wait",
            "--output",
            "json",
        )
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["rollout"]["state"] == "succeeded"
        assert [d["state"] for d in data["devices"]] == ["SUCCEEDED"] * 3
        assert [w["size"] for w in data["waves"]] == [1, 2]
        published = tmp_path / "data" / "bundles" / "detector-2.0.0.jfb"  # beside the db
        assert published.read_bytes() == bundle.read_bytes()
        assert data["rollout"]["bundle_url"] == published.as_uri()
        assert data["rollout"]["bundle_sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert all(d.models["detector"]["active"] == "2.0.0" for d in fleet.devices.values())


def test_tampered_bundle_exits_3_and_sends_nothing(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
) -> None:
    data = bytearray(bundle.read_bytes())
    data[-2048] ^= 0xFF  # inside the last member's contents
    bundle.write_bytes(bytes(data))
    with SimFleet(mosquitto.url, keys.trust, make_devices(1)):
        out = run_cli(env, "rollout", "start", str(bundle), "--target", "all", "--wait")
    assert out.returncode == 3, out.stderr
    assert "failed verification" in out.stderr
    assert counter.per_device() == {}


def test_bundle_signed_by_a_key_outside_the_trust_root_exits_3(
    tmp_path: Path, env: dict[str, str]
) -> None:
    from protocol.keys import SigningKey

    stranger = build_bundle(tmp_path / "other", SigningKey.generate(), version="2.0.0")
    out = run_cli(env, "rollout", "start", str(stranger), "--target", "all")
    assert out.returncode == 3
    assert "bad_signature" in out.stderr or "wrong_role" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--waves", "1,0%"], "--waves"),
        (["--max-failure-rate", "1.5"], "--max-failure-rate"),
        (["--wave-timeout", "0"], "--wave-timeout"),
    ],
)
def test_bad_options_exit_2_with_a_one_line_reason(
    env: dict[str, str], bundle: Path, args: list[str], message: str
) -> None:
    out = run_cli(env, "rollout", "start", str(bundle), "--target", "all", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_group_target_exits_2(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(1)):
        out = run_cli(env, "rollout", "start", str(bundle), "--target", "group:nowhere")
    assert out.returncode == 2
    assert "no known device is in group 'nowhere'" in out.stderr


def test_failing_canary_makes_wait_exit_1_with_the_reason(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3)) as fleet:
        fleet.devices["robot-0001"].behaviour = Behaviour(outcome=JobState.ROLLED_BACK)
        out = run_cli(
            env,
            "rollout",
            "start",
            str(bundle),
            "--target",
            "all",
            "--waves",
            "1,100%",
            "--canary",
            "robot-0001",
            "--wait",
        )
        assert out.returncode == 1, out.stderr
        assert "robot-0001: ROLLED_BACK [latency_regression]" in out.stdout
        assert "crossed --max-failure-rate" in out.stdout
        assert set(counter.per_device()) == {"robot-0001"}


def test_controller_killed_mid_wave_resumes_without_a_second_command_to_any_device(
    mosquitto: LocalMosquitto,
    keys: KeySet,
    env: dict[str, str],
    bundle: Path,
    counter: CommandCounter,
    db: str,
) -> None:
    env = {**env, "JETFLEET_DB": db}  # SQLite, then PostgreSQL
    # Slow jobs (9 events x 0.25 s) so the kill lands while wave 2 is in flight.
    with SimFleet(mosquitto.url, keys.trust, make_devices(4, step_s=0.25)) as fleet:
        proc = subprocess.Popen(
            jetfleet_cmd(
                "rollout",
                "start",
                str(bundle),
                "--target",
                "all",
                "--waves",
                "1,100%",
                "--wait",
                "--output",
                "json",
            ),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def wave2_in_flight() -> bool:
            rows = db_rows(
                env, "SELECT state FROM assignments WHERE wave=1 AND published_at IS NOT NULL"
            )
            return len(rows) == 3 and any(r["state"] not in ("PENDING",) for r in rows)

        wait_until(wave2_in_flight, timeout=30, what="wave 2 in flight")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        rid = db_rows(env, "SELECT id FROM rollouts")[0]["id"]
        # The devices finish their jobs while no controller runs.
        wait_until(
            lambda: all(d.job and d.job["state"] == "SUCCEEDED" for d in fleet.devices.values()),
            timeout=30,
        )
        time.sleep(0.5)
        out = run_cli(env, "rollout", "resume", rid, "--wait", "--output", "json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["rollout"]["state"] == "succeeded"
        assert [d["state"] for d in data["devices"]] == ["SUCCEEDED"] * 4
        seen = counter.per_device()
        assert sorted(seen) == sorted(fleet.devices)
        for device, commands in seen.items():
            assert len(commands) == 1, (device, commands)
        assert all(d.commands_received == 1 for d in fleet.devices.values())


def test_start_without_wait_hands_the_rollout_to_a_background_driver(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)):
        out = run_cli(env, "rollout", "start", str(bundle), "--target", "all", "--output", "json")
        assert out.returncode == 0, out.stderr
        rid = json.loads(out.stdout)["rollout"]["id"]

        def finished() -> bool:
            st = run_cli(env, "rollout", "status", rid, "--output", "json")
            return json.loads(st.stdout)["rollout"]["state"] == "succeeded"

        wait_until(finished, timeout=40, what="the background driver")
        listed = json.loads(run_cli(env, "rollout", "list", "--output", "json").stdout)
        assert listed[0]["id"] == rid and listed[0]["devices"] == 2
        table = run_cli({**env, "COLUMNS": "200"}, "rollout", "list").stdout
        assert rid in table and "succeeded" in table


def test_abort_of_a_paused_rollout_rolls_back_the_devices_that_succeeded(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(3, step_s=CANARY_STEP_S)) as fleet:
        # Pause while the canary is deploying: its wave finishes, no second wave starts.
        rid = start_and_pause_after_the_canary(env, bundle)
        time.sleep(0.5)
        assert db_rows(env, "SELECT state FROM waves WHERE idx=1")[0]["state"] == "pending"
        out = run_cli(env, "rollout", "abort", rid, "--wait", "--output", "json")
        assert out.returncode == 1, out.stderr
        data = json.loads(out.stdout)
        assert data["rollout"]["state"] == "aborted"
        assert data["rollout"]["abort_reason"] == "aborted by the operator"
        assert data["rollbacks"] == {"SUCCEEDED": 1}
        canary = fleet.devices["robot-0000"]
        assert canary.models["detector"] == {"active": "1.0.0", "previous": "2.0.0"}
        assert fleet.devices["robot-0001"].commands_received == 0


def test_rollback_command_returns_the_fleet_to_the_old_version(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)) as fleet:
        assert (
            run_cli(
                env, "rollout", "start", str(bundle), "--target", "all", "--waves", "100%", "--wait"
            ).returncode
            == 0
        )
        out = run_cli(
            env,
            "rollback",
            "--model",
            "detector",
            "--to-version",
            "1.0.0",
            "--target",
            "robot-0000,robot-0001",
            "--wait",
            "--output",
            "json",
        )
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["rollout"]["kind"] == "rollback"
        assert all(d.models["detector"]["active"] == "1.0.0" for d in fleet.devices.values())
        bad = run_cli(
            env,
            "rollback",
            "--model",
            "detector",
            "--to-version",
            "9.9.9",
            "--target",
            "robot-0000",
            "--wait",
        )
        assert bad.returncode == 1
        assert "REJECTED [unknown_version]" in bad.stdout


def test_bundle_url_comes_from_a_running_serve_else_file_url_and_bundle_url_overrides(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path, tmp_path: Path
) -> None:
    data_dir = Path(env["JETFLEET_DB"]).parent
    data_dir.mkdir(parents=True, exist_ok=True)
    serve = data_dir / "serve.json"

    def url_of(*extra: str) -> str:
        out = run_cli(
            env,
            "rollout",
            "start",
            str(bundle),
            "--target",
            "all",
            "--waves",
            "100%",
            "--wait",
            "--output",
            "json",
            *extra,
        )
        assert out.returncode == 0, out.stderr
        return str(json.loads(out.stdout)["rollout"]["bundle_url"])

    with SimFleet(mosquitto.url, keys.trust, make_devices(1)):
        serve.write_text(
            json.dumps({"bundle_url_base": "http://10.0.0.5:8080/bundles/", "pid": os.getpid()})
        )
        assert url_of() == "http://10.0.0.5:8080/bundles/detector-2.0.0.jfb"
        dead = subprocess.Popen(["true"])
        dead.wait()
        serve.write_text(json.dumps({"bundle_url_base": "http://x/bundles", "pid": dead.pid}))
        assert url_of().startswith("file:///")
        assert url_of("--bundle-url", "https://cdn.example/d.jfb") == "https://cdn.example/d.jfb"


def test_republishing_a_version_with_different_content_is_refused(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path, tmp_path: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(1)):
        ok = run_cli(
            env, "rollout", "start", str(bundle), "--target", "all", "--waves", "100%", "--wait"
        )
        assert ok.returncode == 0, ok.stderr
        other = build_bundle(tmp_path / "rebuilt", keys.release, version="2.0.0", seed=7)
        out = run_cli(env, "rollout", "start", str(other), "--target", "all")
        assert out.returncode == 2
        assert "already published with different content" in out.stderr


def test_broker_down_exits_1_and_starts_nothing(
    mosquitto: LocalMosquitto, env: dict[str, str], bundle: Path
) -> None:
    mosquitto.stop()
    out = run_cli(env, "rollout", "start", str(bundle), "--target", "all")
    assert out.returncode == 1
    assert "the rollout was not started" in out.stderr
    assert run_cli(env, "rollout", "list", "--output", "json").stdout.strip() == "[]"


def test_status_tells_the_operator_when_no_process_drives_an_unfinished_rollout(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2, step_s=0.3)):
        proc = subprocess.Popen(
            jetfleet_cmd(
                "rollout", "start", str(bundle), "--target", "all", "--waves", "1,100%", "--wait"
            ),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: bool(db_rows(env, "SELECT 1 FROM assignments WHERE published_at IS NOT NULL")),
            timeout=20,
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        rid = db_rows(env, "SELECT id FROM rollouts")[0]["id"]
        out = run_cli({**env, "COLUMNS": "150"}, "rollout", "status", rid[:6])
        assert out.returncode == 0, out.stderr
        assert f"rollout {rid}" in out.stdout
        assert f"jetfleet rollout resume {rid}" in out.stdout
        assert "no such" not in out.stdout


def test_offline_targets_are_named_at_start_and_time_out_with_their_wave(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)) as fleet:
        fleet.disconnect_device("robot-0001")

        def offline_seen() -> bool:
            out = run_cli(env, "devices", "--output", "json")
            return [d["online"] for d in json.loads(out.stdout)] == [True, False]

        wait_until(offline_seen, timeout=15, what="the will message")
        out = run_cli(
            env,
            "rollout",
            "start",
            str(bundle),
            "--target",
            "all",
            "--waves",
            "100%",
            "--wave-timeout",
            "2",
            "--max-failure-rate",
            "0.5",
            "--offline",
            "fail",
            "--wait",
            "--output",
            "json",
        )
        assert "1 target device(s) offline (robot-0001)" in out.stderr
        assert out.returncode == 0, out.stderr
        states = {d["device_id"]: d["state"] for d in json.loads(out.stdout)["devices"]}
        assert states == {"robot-0000": "SUCCEEDED", "robot-0001": "TIMED_OUT"}


@pytest.mark.parametrize("mode", ["wait", "skip"])
def test_an_offline_robot_is_left_to_the_release_not_failed_unless_offline_fail(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path, mode: str
) -> None:
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)) as fleet:
        fleet.disconnect_device("robot-0001")

        def offline_seen() -> bool:
            out = run_cli(env, "devices", "--output", "json")
            return [d["online"] for d in json.loads(out.stdout)] == [True, False]

        wait_until(offline_seen, timeout=15, what="the will message")
        # --max-failure-rate 0: one failure would abort the rollout.
        args = ["--waves", "100%", "--wave-timeout", "2", "--max-failure-rate", "0"]
        if mode != "wait":  # wait is the default
            args += ["--offline", mode]
        out = run_cli(env, "rollout", "start", str(bundle), "--target", "all", *args,
                      "--wait", "--output", "json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        devices = {d["device_id"]: d for d in data["devices"]}
        assert devices["robot-0000"]["state"] == "SUCCEEDED"
        assert (devices["robot-0001"]["state"], devices["robot-0001"]["code"]) == (
            "CANCELED",
            "offline",
        )
        assert f"--offline {mode}" in devices["robot-0001"]["reason"]
        # skip sends it nothing; wait sent the deploy and a cancel behind it.
        assert (devices["robot-0001"]["command_id"] is None) == (mode == "skip")
        assert data["left_to_release"] == ["robot-0001"]
        assert data["rollout"]["policy"]["offline"] == mode
        shown = run_cli(env, "rollout", "status").stdout
        assert f"offline robots: {mode}" in shown
        assert "left to converge through the release: robot-0001" in shown


def test_a_second_rollout_on_devices_a_paused_one_still_drives_is_refused_unless_forced(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], bundle: Path, tmp_path: Path
) -> None:
    newer = build_bundle(tmp_path / "build3", keys.release, version="3.0.0")
    with SimFleet(mosquitto.url, keys.trust, make_devices(3, step_s=CANARY_STEP_S)) as fleet:
        # Paused after its canary: robot-0000 is done (SUCCEEDED), the others still wait
        # for their wave in it.
        held_by = start_and_pause_after_the_canary(env, bundle)

        refusals = [
            run_cli(env, "rollout", "start", str(newer), "--target", "robot-0001,robot-0002"),
            run_cli(
                env, "rollback", "--model", "detector", "--to-version", "1.0.0", "--target", "all"
            ),
            run_cli(env, "keys", "push", "--target", "robot-0002"),
        ]
        for out in refusals:
            assert out.returncode == 2, out.stderr
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1, out.stderr
            assert held_by in lines[0] and "--force" in lines[0]
            assert "robot-0000" not in lines[0]  # terminal in the paused rollout: free
        assert "robot-0001, robot-0002" in refusals[0].stderr
        assert "robot-0001, robot-0002" in refusals[1].stderr
        assert "robot-0002" in refusals[2].stderr
        assert len(db_rows(env, "SELECT id FROM rollouts")) == 1  # nothing was stored
        assert fleet.devices["robot-0001"].commands_received == 0
        assert fleet.devices["robot-0002"].commands_received == 0

        # A device that finished in the paused rollout is free for another one.
        free = run_cli(env, "rollout", "start", str(newer), "--target", "robot-0000", "--wait")
        assert free.returncode == 0, free.stderr
        assert fleet.devices["robot-0000"].models["detector"]["active"] == "3.0.0"
        # --force overrides: the operator takes the risk.
        forced = run_cli(
            env, "rollout", "start", str(newer), "--target", "robot-0001", "--force", "--wait"
        )
        assert forced.returncode == 0, forced.stderr
        assert fleet.devices["robot-0001"].models["detector"]["active"] == "3.0.0"
        assert fleet.devices["robot-0002"].commands_received == 0

        out = run_cli(env, "rollout", "abort", held_by, "--no-rollback", "--wait")
        assert out.returncode == 1, out.stderr
