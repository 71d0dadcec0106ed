"""The broker goes away in the middle of a job and comes back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocol.topics import Topics
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    engine_link_state,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)

DEV = "robot-3"


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_broker_restart_mid_job_job_finishes_and_events_arrive_in_order(
    protocol: str, tmp_path: Path, mosquitto, trust_material
) -> None:
    data = tmp_path / "data"
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=data,
        trust_root=trust_material.write(tmp_path / "trust.json"),
        health="true",
        protocol=protocol,
    )
    bundle = build_bundle(tmp_path, trust_material.release, gate={"probation_s": 1.0})
    with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg) as agent:
        events.wait_online()
        cmd = make_command(DEV, "deploy", deploy_body(bundle))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        events.wait_state(cmd.command_id, "PROBATION", timeout=60)
        mosquitto.stop()
        # Probation ends while the broker is away: SUCCEEDED is queued on the device.
        time.sleep(1.5)
        assert agent.alive()
        mosquitto.start()
        final = events.wait_terminal(cmd.command_id, timeout=60)
        assert final.state.value == "SUCCEEDED", agent.log()[-2000:]
        events.wait_status(lambda s: s.online and s.models.get("detector") is not None)
    assert engine_link_state(data, "detector") == ("1.0.0", None)
    arrival = [e.seq for e in events.events]
    firsts = [s for i, s in enumerate(arrival) if s not in arrival[:i]]
    assert firsts == sorted(firsts), arrival  # never out of order
    assert firsts == list(range(firsts[0], firsts[-1] + 1)), arrival  # none lost
    assert [e.state.value for e in events.for_command(cmd.command_id)][-1] == "SUCCEEDED"
