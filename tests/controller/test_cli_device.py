"""`jetfleet device show ID` and `jetfleet device forget ID` as an operator runs them
(issue 19): real subprocesses, a real broker, simulated devices, a real telemetry store."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from fleet import SimFleet, build_bundle, cli_env, make_devices, run_cli, wait_until

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet
from controller.telemetry.store import TelemetryStore, row_from_sample
from protocol.telemetry import TelemetrySample


@pytest.fixture
def env(tmp_path: Path, mosquitto: LocalMosquitto, keys: KeySet) -> dict[str, str]:
    return {**cli_env(tmp_path, mosquitto.url, tmp_path / "keys"), "COLUMNS": "200"}


def collect_telemetry(env: dict[str, str], device: str) -> None:
    """What `jetfleet serve` would have stored: one sample, in telemetry.db beside the db."""
    sample = TelemetrySample.new(
        device_id=device,
        at=datetime.now(timezone.utc),
        uptime_s=100,
        cpu={"percent": [25.0]},
        mem={"total": 8 * 2**30, "used": 3 * 2**30, "available": 5 * 2**30},
        temps={"cpu": 51.5},
        models={"detector": {"version": "2.0.0", "p50_ms": 1.5, "p99_ms": 4.25, "count": 10}},
    )
    store = TelemetryStore(Path(env["JETFLEET_DB"]).with_name("telemetry.db"))
    store.insert_batch([row_from_sample(sample, sample.encode().decode())])
    store.close()


@pytest.mark.slow
def test_device_show_describes_one_robot_and_forget_removes_a_decommissioned_one(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], tmp_path: Path
) -> None:
    bundle = build_bundle(tmp_path / "build", keys.release, version="2.0.0")
    with SimFleet(mosquitto.url, keys.trust, make_devices(2)) as fleet:
        done = run_cli(env, "rollout", "start", str(bundle), "--target", "all", "--wait",
                       "--waves", "100%", "-o", "json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        rid = json.loads(done.stdout)["rollout"]["id"]
        collect_telemetry(env, "robot-0000")

        shown = run_cli(env, "device", "show", "robot-0000")
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout
        for expected in (
            "robot-0000",
            "fleet",
            "simulated Jetson",
            "onnxruntime",
            rid,
            "p99 1.00 ms",
            "memory 3.00/8.00 GiB",
            "detector 2.0.0 p99 4.25 ms",
        ):
            assert expected in text, (expected, text)  # fmt: skip
        models_row = next(line for line in text.splitlines() if line.startswith("│ detector"))
        assert "2.0.0" in models_row and "1.0.0" in models_row  # active, previous

        as_json = json.loads(run_cli(env, "device", "show", "robot-0000", "-o", "json").stdout)
        assert as_json["models"]["detector"] == {"active": "2.0.0", "previous": "1.0.0"}
        assert [(j["rollout_id"], j["state"]) for j in as_json["jobs"]] == [(rid, "SUCCEEDED")]
        assert as_json["telemetry"]["models"]["detector"]["p99_ms"] == 4.25

        typo = run_cli(env, "device", "show", "robot-9")
        assert typo.returncode == 2
        assert "no device 'robot-9'" in typo.stderr and "robot-0000, robot-0001" in typo.stderr

        # Online: refused (its agent would publish its status again).
        online = run_cli(env, "device", "forget", "robot-0001")
        assert online.returncode == 2 and "robot-0001 is online" in online.stderr
        fleet.disconnect_device("robot-0001")

        def offline() -> bool:
            out = run_cli(env, "devices", "-o", "json")
            return any(d["id"] == "robot-0001" and not d["online"] for d in json.loads(out.stdout))

        wait_until(offline, timeout=15, what="the will")
        gone = run_cli(env, "device", "forget", "robot-0001")
        assert gone.returncode == 0, gone.stderr
        listed = [d["id"] for d in json.loads(run_cli(env, "devices", "-o", "json").stdout)]
        assert listed == ["robot-0000"]
        # Its retained status is gone from the broker too: another controller never sees it.
        other = {**env, "JETFLEET_DB": str(tmp_path / "other" / "controller.db")}
        listed = [d["id"] for d in json.loads(run_cli(other, "devices", "-o", "json").stdout)]
        assert listed == ["robot-0000"]


@pytest.mark.slow
def test_device_windows_by_signed_command_holds_a_real_agent_until_cleared(
    mosquitto: LocalMosquitto, keys: KeySet, env: dict[str, str], tmp_path: Path
) -> None:
    from protocol.topics import Topics
    from tests.agent.harness import (
        AgentProcess,
        EventCollector,
        deploy_body,
        make_command,
        publish,
        sign_command,
        write_agent_config,
    )

    clock = tmp_path / "clock"
    clock.write_text("2026-12-07T12:00:00+00:00")  # a Monday, noon
    cfg = write_agent_config(tmp_path / "agent.toml", device_id="robot-w", groups=["night"],
                             broker_url=mosquitto.url, data_dir=tmp_path / "agent",
                             trust_root=tmp_path / "keys" / "trust.json")  # fmt: skip
    bundle = build_bundle(tmp_path / "build", keys.release, version="2.0.0")
    agent_env = {"JETFLEET_AGENT_TEST_CLOCK_FILE": str(clock)}
    with EventCollector(mosquitto.url, "robot-w") as events, AgentProcess(cfg, env=agent_env):
        events.wait_online()
        bad = run_cli(env, "device", "windows", "group:night", "--window", "weekdays 22-6")
        assert bad.returncode == 2 and "not 'DAYS HH:MM-HH:MM'" in bad.stderr, bad.stderr
        sent = run_cli(env, "device", "windows", "group:night", "--window", "Mon 22:00-23:00",
                       "--timezone", "UTC")  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        wid = sent.stdout.split()[3]
        assert events.wait_terminal(wid).reason == "windows set: Mon 22:00-23:00 (UTC)"

        def shown() -> dict[str, Any]:
            out = run_cli(env, "device", "show", "robot-w", "--output", "json")
            return dict(json.loads(out.stdout)["windows"] or {})

        # Its retained status carries the windows in force, and who set them.
        want = {"windows": ["Mon 22:00-23:00"], "timezone": "UTC", "source": "command"}
        wait_until(lambda: shown() == want, timeout=20, what="windows in the status")
        human = run_cli(env, "device", "show", "robot-w").stdout
        assert "Mon 22:00-23:00 (UTC; set by a windows command)" in human

        cmd = make_command("robot-w", "deploy", deploy_body(bundle))
        publish(mosquitto.url, Topics().device_cmd("robot-w"), sign_command(cmd, keys.operator))
        held = events.wait_state(cmd.command_id, "ON_HOLD", timeout=60)
        assert held.code == "window" and "Mon 22:00-23:00 (UTC)" in (held.reason or "")

        cleared = run_cli(env, "device", "windows", "robot-w", "--clear")
        assert cleared.returncode == 0, cleared.stderr
        final = events.wait_terminal(cmd.command_id, timeout=60)  # agent.toml has none
        assert final.state.value == "SUCCEEDED"
        want = {"windows": [], "timezone": "", "source": "config"}
        wait_until(lambda: shown() == want, timeout=20, what="agent.toml's windows again")
