"""Every deployable model of the corpus (tests/modelzoo.py), as a new user would ship it:
`jetfleet bundle build` -> `jetfleet rollout start --wait` -> a REAL agent on a real
Mosquitto builds, gates and activates it. One broker and one agent serve the whole corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fleet import cli_env, run_cli, wait_until
from modelzoo import DEPLOYABLE, ZooModel

from controller.keystore import init_keys
from controller.localbroker import LocalMosquitto

pytestmark = pytest.mark.slow
DEVICE = "robot-zoo"


@dataclass
class Robot:
    env: dict[str, str]
    root: Path
    agent: Any

    def jetfleet(self, *args: str | Path, timeout: float = 240) -> Any:
        return run_cli(self.env, *(str(a) for a in args), timeout=timeout)

    def models(self) -> dict[str, Any]:
        out = self.jetfleet("devices", "--output", "json")
        assert out.returncode == 0, out.stderr
        return {d["id"]: d for d in json.loads(out.stdout)}[DEVICE]["models"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def robot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Robot]:
    from tests.agent.harness import AgentProcess, write_agent_config

    root = tmp_path_factory.mktemp("zoo")
    init_keys(root / "keys")
    broker = LocalMosquitto(root / "broker")
    broker.start()
    cfg = write_agent_config(
        root / DEVICE / "agent.toml",
        device_id=DEVICE,
        broker_url=broker.url,
        data_dir=root / DEVICE / "data",
        trust_root=root / "keys" / "trust.json",
        telemetry_interval_s=60,
    )
    agent = AgentProcess(cfg, env={"OMP_NUM_THREADS": "1"}).start()
    try:
        r = Robot(cli_env(root, broker.url, root / "keys"), root, agent)
        wait_until(
            lambda: r.jetfleet("devices", "--output", "json").stdout.count(DEVICE) > 0,
            timeout=60,
            what="the agent online",
        )
        yield r
    finally:
        agent.stop()
        broker.stop()


@pytest.mark.parametrize("zoo", DEPLOYABLE, ids=str)
def test_bundle_build_then_rollout_to_a_real_agent_makes_the_model_active(
    zoo: ZooModel, robot: Robot
) -> None:
    name = zoo.name.replace("_", "-")
    model = zoo.build(robot.root / "models" / zoo.name)
    bundle = robot.root / "bundles" / f"{name}-1.0.0.jfb"
    profiles = [a for p in zoo.profiles for a in ("--profile", p)]
    built = robot.jetfleet(
        "bundle", "build", model, "--name", name, "--version", "1.0.0",
        *profiles, "--probation-s", "0", "-o", bundle,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    out = robot.jetfleet(
        "rollout", "start", bundle, "--target", DEVICE, "--waves", "100%", "--wait"
    )
    assert out.returncode == 0, out.stdout + out.stderr + robot.agent.log()[-3000:]
    assert robot.models()[name]["active"] == "1.0.0"
