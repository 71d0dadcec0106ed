"""kill -9 of the agent at every non-terminal state of a deploy, then a restart.

The device must end consistent: the old or the new engine active, exactly what the last
event and the retained status say, no temporary files left, seq still increasing.
The agent holds at a state through its test-only hook JETFLEET_AGENT_TEST_PAUSE_AT.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.topics import Topics
from tests.agent.harness import (
    REPO,
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    engine_link_state,
    make_command,
    publish,
    sign_command,
    tmp_leftovers,
    write_agent_config,
)

DEV = "robot-9"
PAUSE = "JETFLEET_AGENT_TEST_PAUSE_AT"


# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = pytest.mark.xdist_group("test_agent_crash")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, trust_material):
    """A data dir with detector 1.0.0 active, made by an offline `jetfleet-agent install`,
    and a signed 1.1.0 bundle: copied fresh for each test."""
    root = tmp_path_factory.mktemp("crash-base")
    trust = trust_material.write(root / "trust.json")
    cfg = write_agent_config(
        root / "agent.toml",
        device_id=DEV,
        broker_url="mqtt://127.0.0.1:1",
        data_dir=root / "data",
        trust_root=trust,
    )
    v1 = build_bundle(root, trust_material.release, version="1.0.0", seed=0)
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "install", str(v1), "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert engine_link_state(root / "data", "detector") == ("1.0.0", None)
    v2 = build_bundle(root, trust_material.release, version="1.1.0", seed=0)
    return root, trust, v2


STATES = [
    ("RECEIVED", "SUCCEEDED"),
    ("QUEUED", "SUCCEEDED"),
    ("DOWNLOADING", "SUCCEEDED"),
    ("VERIFYING", "SUCCEEDED"),
    ("BUILDING", "SUCCEEDED"),
    ("VALIDATING", "SUCCEEDED"),
    ("ACTIVATING", "ROLLED_BACK"),
    ("ACTIVATING:switched", "ROLLED_BACK"),
    ("PROBATION", "ROLLED_BACK"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("pause_at", "outcome"), STATES, ids=[s for s, _ in STATES])
def test_kill9_at_state_then_restart_leaves_device_consistent(
    pause_at: str, outcome: str, baseline, tmp_path: Path, mosquitto, trust_material
) -> None:
    base, trust, v2 = baseline
    data = tmp_path / "data"
    shutil.copytree(base / "data", data, symlinks=True)
    hook_log = tmp_path / "hook.log"
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=data,
        trust_root=trust,
        hook=f'echo "$JETFLEET_VERSION" >> {hook_log}',
    )
    with EventCollector(mosquitto.url, DEV) as events:
        agent = AgentProcess(cfg, env={PAUSE: pause_at}).start()
        events.wait_online()
        cmd = make_command(DEV, "deploy", deploy_body(v2))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        state = pause_at.split(":")[0]
        events.wait_state(cmd.command_id, state, timeout=60)
        if pause_at == "ACTIVATING:switched":
            deadline = time.monotonic() + 20
            while engine_link_state(data, "detector")[0] != "1.1.0":
                assert time.monotonic() < deadline, "switch never happened"
                time.sleep(0.02)
        else:
            time.sleep(0.2)  # the hold begins right after the event is queued
        agent.kill9()

        agent = AgentProcess(cfg).start()
        try:
            final = events.wait_terminal(cmd.command_id, timeout=90)
            assert final.state.value == outcome, (final, agent.log()[-2000:])
            if outcome == "ROLLED_BACK":
                assert final.code == "interrupted" and "1.0.0 is active again" in final.reason
                expected = ("1.0.0", None)
            else:
                expected = ("1.1.0", "1.0.0")
            status = events.wait_status(
                lambda s: (
                    s.job is None
                    and s.models.get("detector") is not None
                    and s.models["detector"].active == expected[0]
                )
            )
            assert engine_link_state(data, "detector") == expected
            assert status.models["detector"].previous == expected[1]
            assert (data / "models/detector/current/engine").is_file()
        finally:
            agent.stop()
    # Every event arrived; duplicates (a resend after kill -9) carry the same seq.
    seqs = sorted({e.seq for e in events.events})
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    arrival = [e.seq for e in events.events]
    deduped = [s for i, s in enumerate(arrival) if s not in arrival[:i]]
    assert deduped == sorted(deduped)
    assert tmp_leftovers(data) == []
    # The broker redelivered the unacknowledged command after the kill: not a "replay".
    assert "REJECTED" not in [e.state.value for e in events.for_command(cmd.command_id)]
    hooks = hook_log.read_text().split() if hook_log.exists() else []
    if pause_at == "PROBATION":
        # The hook ran for the switch and again for the way back.
        assert hooks == ["1.1.0", "1.0.0"]
    elif outcome == "ROLLED_BACK":
        # Killed before the hook's first run: it runs once, on the restored engine.
        assert hooks == ["1.0.0"]
    else:
        assert hooks == ["1.1.0"]
