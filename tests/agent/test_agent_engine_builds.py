"""Engine builds seen from outside a real agent: build progress in BUILDING events, and a
cached TensorRT plan that no longer deserializes rebuilt instead of failing the deploy.

Real agent, broker, engine child and ONNX Runtime. For TensorRT the engine child imports
tests/agent/fake_jetson.py as `tensorrt`/`pycuda` (fake_jetson.write_site): the backend,
cache, gate and worker code are the real ones. The bundles' golden outputs are what the
fake engine computes (y = 2 * x), so the accuracy gate judges for real.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.engines.api import EngineMeta
from agent.engines.sidecar import read_meta, write_meta
from protocol.fsio import sha256_file
from protocol.messages import JobEvent
from protocol.topics import Topics
from tests.agent import fake_jetson
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
from tests.models import mlp_inputs

pytestmark = pytest.mark.slow

FAKE_TRT = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda")),
    reason="the real TensorRT/pycuda are here",
)


class Robot:
    def __init__(self, tmp_path: Path, mosquitto: Any, trust: Any, events: EventCollector):
        self.tmp_path, self.mosquitto, self.trust, self.events = tmp_path, mosquitto, trust, events

    def deploy(self, version: str, **bundle: Any) -> tuple[JobEvent, list[JobEvent]]:
        path = build_bundle(self.tmp_path, self.trust.release, version=version, **bundle)
        cmd = make_command("group:canary", "deploy", deploy_body(path))
        topic = Topics().group_cmd("canary")
        publish(self.mosquitto.url, topic, sign_command(cmd, self.trust.operator))
        final = self.events.wait_terminal(cmd.command_id, timeout=90)
        return final, self.events.for_command(cmd.command_id)


@pytest.fixture
def robot(request: pytest.FixtureRequest, tmp_path: Path, mosquitto: Any,
          trust_material: Any) -> Iterator[tuple[Robot, AgentProcess]]:  # fmt: skip
    backend = request.param
    env = {}
    if backend == "tensorrt":
        site = fake_jetson.write_site(tmp_path / "site")
        env = {"PYTHONPATH": f"{site}:{REPO}", "JETFLEET_AGENT_LOG_LEVEL": "warning"}
    cfg = write_agent_config(
        tmp_path / "agent.toml", device_id="robot-1", groups=["canary"],
        broker_url=mosquitto.url, data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"), backend=backend,
        health="true",
    )  # fmt: skip
    with EventCollector(mosquitto.url, "robot-1") as events, AgentProcess(cfg, env=env) as agent:
        events.wait_online()
        yield Robot(tmp_path, mosquitto, trust_material, events), agent


def _build_progress(events: list[JobEvent]) -> list[tuple[str | None, float]]:
    return [(e.phase, e.progress) for e in events if e.state.value == "BUILDING" and e.phase]


# y = 2 * x cut to y's 16 columns: what the fake TensorRT engine computes, so its gate
# passes on accuracy.
FOR_FAKE_TRT = {
    "golden_override": {"output.y": 2 * mlp_inputs(4, seed=1)["x"][:, :16]},
    "build": {"profiles": {"x": {"min": [1, 64], "opt": [4, 64], "max": [8, 64]}}},
}


@FAKE_TRT
@pytest.mark.parametrize("robot", ["tensorrt"], indirect=True)
def test_a_tensorrt_build_reports_its_phases_in_building_events(
    robot: tuple[Robot, AgentProcess],
) -> None:
    bot, agent = robot
    final, events = bot.deploy("1.0.0", **FOR_FAKE_TRT)
    assert final.state.value == "SUCCEEDED", agent.log()[-3000:]
    # Each phase's start and end, not one event per TensorRT step (throttled).
    assert _build_progress(events) == [
        ("Building engine", 0.0), ("Building engine", 1.0),
        ("Serializing", 0.0), ("Serializing", 1.0),
    ]  # fmt: skip


@pytest.mark.parametrize("robot", ["onnxruntime"], indirect=True)
def test_an_onnxruntime_build_reports_its_one_phase(robot: tuple[Robot, AgentProcess]) -> None:
    bot, agent = robot
    final, events = bot.deploy("1.0.0")
    assert final.state.value == "SUCCEEDED", agent.log()[-3000:]
    assert _build_progress(events) == [("optimizing graph", 0.0), ("optimizing graph", 1.0)]


def _spoil_cache_entry(data_dir: Path) -> Path:
    """Replace the cached plan by bytes TensorRT will not deserialize, with a sidecar that
    matches them (a new inode: the active version's hard link keeps the good plan)."""
    [engine] = (data_dir / "engines").glob("*.engine")
    meta = read_meta(engine)
    spoiled = engine.with_name("spoiled")
    spoiled.write_bytes(b"\x00 a plan for another TensorRT \x00")
    spoiled.replace(engine)
    write_meta(engine, EngineMeta(meta.backend, meta.backend_version, sha256_file(engine),
                                  meta.key, meta.extra))  # fmt: skip
    return engine


@FAKE_TRT
@pytest.mark.parametrize("robot", ["tensorrt"], indirect=True)
def test_a_cached_plan_that_no_longer_deserializes_is_rebuilt_not_a_failed_deploy(
    robot: tuple[Robot, AgentProcess], tmp_path: Path
) -> None:
    bot, agent = robot
    final, _ = bot.deploy("1.0.0", **FOR_FAKE_TRT)
    assert final.state.value == "SUCCEEDED", agent.log()[-3000:]
    engine = _spoil_cache_entry(tmp_path / "data")
    # The same model and build options: the same cache key, so the cache has a "hit".
    final, events = bot.deploy("1.0.1", **FOR_FAKE_TRT)
    assert final.state.value == "SUCCEEDED", agent.log()[-3000:]
    assert "engine_cache_entry_unloadable_rebuilding" in agent.log()
    assert _build_progress(events), "the plan was rebuilt, not taken from the cache"
    assert "io" in json.loads(engine.read_bytes())


@FAKE_TRT
@pytest.mark.parametrize("robot", ["tensorrt"], indirect=True)
def test_a_dla_engine_with_more_gpu_layers_than_the_manifest_allows_is_refused_with_counts(
    robot: tuple[Robot, AgentProcess],
) -> None:
    bot, agent = robot
    dla = {**FOR_FAKE_TRT["build"], "precision": "fp16", "dla_core": 0}
    final, _ = bot.deploy("1.0.0", golden_override=FOR_FAKE_TRT["golden_override"],
                          build=dla, gate={"max_gpu_fallback_layers": 1})  # fmt: skip
    assert (final.state.value, final.code) == ("ROLLED_BACK", "gpu_fallback"), agent.log()[-3000:]
    layers = (final.gate or {})["layers"]
    assert layers["dla"] >= 1 and layers["gpu"] > 1
    assert (
        f"{layers['gpu']} of the engine's {layers['gpu'] + layers['dla']} layers run on the GPU "
        f"({layers['dla']} on the DLA), more than the max_gpu_fallback_layers of 1"
    ) in (final.reason or "")
