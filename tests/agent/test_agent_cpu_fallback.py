"""`backend = auto` on a Jetson whose TensorRT cannot run (pycuda missing: it builds from
source on JetPack 6 and needs nvcc). The real agent either runs the bundle on the CPU and
says so in its status, or, with allow_cpu_fallback = false, rejects the deploy.

JetPack's tensorrt module is faked by its version attribute (the part the agent reads
before it needs pycuda); everything else is the real agent, broker and ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from protocol.topics import Topics
from tests.agent.harness import (
    REPO,
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("pycuda") is not None, reason="pycuda is installed here"
    ),
]


def _deploy(tmp_path: Path, mosquitto: Any, trust_material: Any, env: dict[str, str]) -> Any:
    site = tmp_path / "site"
    site.mkdir()
    (site / "tensorrt.py").write_text('__version__ = "10.3.0"\n')
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-1",
        groups=["canary"],
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
        backend="auto",
        health="true",
    )
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    env = {"PYTHONPATH": f"{site}:{REPO}", **env}
    with EventCollector(mosquitto.url, "robot-1") as events, AgentProcess(cfg, env=env) as agent:
        events.wait_online()
        cmd = make_command("group:canary", "deploy", deploy_body(bundle))
        publish(
            mosquitto.url, Topics().group_cmd("canary"), sign_command(cmd, trust_material.operator)
        )
        final = events.wait_terminal(cmd.command_id, timeout=90)
        status = events.wait_status(lambda s: s.job is None)
        return final, status, agent.log()


def test_auto_without_pycuda_runs_on_the_cpu_and_reports_why_in_status(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    final, status, log = _deploy(tmp_path, mosquitto, trust_material, {})
    assert final.state.value == "SUCCEEDED", log[-3000:]
    assert status.hardware.backend == "onnxruntime"
    assert "pycuda is not installed" in (status.hardware.backend_fallback or "")


def test_a_config_refusing_the_cpu_fallback_rejects_the_deploy_as_unsupported(
    tmp_path: Path, mosquitto: Any, trust_material: Any
) -> None:
    env = {"JETFLEET_AGENT_ALLOW_CPU_FALLBACK": "false"}
    final, _, log = _deploy(tmp_path, mosquitto, trust_material, env)
    assert final.state.value == "REJECTED", log[-3000:]
    assert final.code == "unsupported"
    assert "pycuda is not installed" in final.reason and "allow_cpu_fallback" in final.reason
