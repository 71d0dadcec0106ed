"""A signed deploy through the real agent subprocess and a real Mosquitto."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
    tmp_leftovers,
    write_agent_config,
)

DEPLOY_PATH = [
    "RECEIVED",
    "QUEUED",
    "DOWNLOADING",
    "VERIFYING",
    "BUILDING",
    "VALIDATING",
    "ACTIVATING",
    "PROBATION",
    "SUCCEEDED",
]


def test_signed_deploy_succeeds_and_status_shows_new_version(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    data = tmp_path / "data"
    hook_log = tmp_path / "hook.log"
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-1",
        groups=["canary"],
        broker_url=mosquitto.url,
        data_dir=data,
        trust_root=trust_material.write(tmp_path / "trust.json"),
        hook=f'echo "$JETFLEET_MODEL $JETFLEET_VERSION" >> {hook_log}',
        health="true",
    )
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    topic = Topics().events("robot-1")
    # mosquitto_sub, the operator's own tool, sees the events too.
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-t", topic, "-q", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with EventCollector(mosquitto.url, "robot-1") as events, AgentProcess(cfg) as agent:
            events.wait_online()
            cmd = make_command("group:canary", "deploy", deploy_body(bundle, rollout_id="r-1"))
            publish(
                mosquitto.url,
                Topics().group_cmd("canary"),
                sign_command(cmd, trust_material.operator),
            )
            final = events.wait_terminal(cmd.command_id, timeout=90)
            assert final.state.value == "SUCCEEDED", (final, agent.log()[-3000:])
            assert events.states(cmd.command_id) == DEPLOY_PATH
            assert all(e.rollout_id == "r-1" for e in events.for_command(cmd.command_id))
            assert final.gate and "p99_ms" in final.gate
            status = events.wait_status(
                lambda s: (
                    s.models.get("detector") is not None
                    and s.models["detector"].active == "1.0.0"
                    and s.job is None
                )
            )
            assert status.online and status.last_seq == final.seq
        assert engine_link_state(data, "detector") == ("1.0.0", None)
        assert (data / "models/detector/current/engine").is_file()
        assert hook_log.read_text().split("\n")[0] == "detector 1.0.0"
        assert tmp_leftovers(data) == []
    finally:
        sub.terminate()
        out, _ = sub.communicate(timeout=5)
    seen = [line for line in out.splitlines() if cmd.command_id in line]
    assert any('"state":"SUCCEEDED"' in line for line in seen)


def test_deploy_over_http_from_a_bundle_server(tmp_path: Path, mosquitto, trust_material) -> None:
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    data = tmp_path / "data"
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-1",
        broker_url=mosquitto.url,
        data_dir=data,
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )
    served = tmp_path / "served"
    served.mkdir()
    bundle = build_bundle(served, trust_material.release, version="2.0.0")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{bundle.name}"
    try:
        with EventCollector(mosquitto.url, "robot-1") as events, AgentProcess(cfg):
            events.wait_online()
            cmd = make_command("robot-1", "deploy", deploy_body(bundle, url=url))
            publish(
                mosquitto.url,
                Topics().device_cmd("robot-1"),
                sign_command(cmd, trust_material.operator),
            )
            assert events.wait_terminal(cmd.command_id).state.value == "SUCCEEDED"
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert engine_link_state(data, "detector") == ("2.0.0", None)
    assert tmp_leftovers(data) == [] and not any((data / "downloads").iterdir())
