from __future__ import annotations

from pathlib import Path

from protocol.topics import Topics
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)


def test_ping_goes_received_then_succeeded(tmp_path: Path, mosquitto, trust_material) -> None:
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-1",
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )
    with EventCollector(mosquitto.url, "robot-1") as events:
        agent = AgentProcess(cfg).start()
        try:
            events.wait_online()
            cmd = make_command("robot-1", "ping")
            publish(
                mosquitto.url,
                Topics().device_cmd("robot-1"),
                sign_command(cmd, trust_material.operator),
            )
            events.wait_state(cmd.command_id, "SUCCEEDED", timeout=20)
            assert events.states(cmd.command_id) == ["RECEIVED", "SUCCEEDED"]
        finally:
            agent.stop()
            print(agent.log())
