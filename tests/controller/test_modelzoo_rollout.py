"""Every deployable model of the corpus (tests/modelzoo.py), as a new user would ship it:
`jetfleet bundle build` -> `jetfleet rollout start --wait` -> a REAL agent on a real
Mosquitto builds, gates and activates it -> the robot's runtime (agent.runtime) serves it.
One broker and one agent serve the whole corpus.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet import cli_env, run_cli, wait_until
from modelzoo import DEPLOYABLE, ZooModel
from typer.testing import CliRunner

from agent.runtime import ModelRuntime
from controller.cli.main import app
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import init_keys

# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_modelzoo_rollout")]
DEVICE = "robot-zoo"


@dataclass
class Robot:
    env: dict[str, str]
    root: Path
    agent: Any

    @property
    def data_dir(self) -> Path:
        return self.root / DEVICE / "data"

    def jetfleet(self, *args: str | Path, timeout: float = 240) -> Any:
        return run_cli(self.env, *(str(a) for a in args), timeout=timeout)

    def bundle_build(self, *args: str | Path) -> Any:
        """In-process (the CLI's own code, without a second interpreter start-up)."""
        env: dict[str, str | None] = {"JETFLEET_CONFIG": None}  # no operator config
        env |= {k: self.env[k] for k in ("JETFLEET_KEYS", "XDG_CONFIG_HOME", "XDG_DATA_HOME")}
        return CliRunner().invoke(app, ["bundle", "build", *map(str, args)], env=env)


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
def test_bundle_build_then_rollout_to_a_real_agent_makes_the_model_active_and_served(
    zoo: ZooModel, robot: Robot
) -> None:
    name = zoo.name.replace("_", "-")
    model = zoo.build(robot.root / "models" / zoo.name)
    bundle = robot.root / "bundles" / f"{name}-1.0.0.jfb"
    profiles = [a for p in zoo.profiles for a in ("--profile", p)]
    built = robot.bundle_build(
        model, "--name", name, "--version", "1.0.0", *profiles, "--probation-s", "0",
        "--out", bundle,
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    out = robot.jetfleet(
        "rollout", "start", bundle, "--target", DEVICE, "--waves", "100%", "--wait"
    )
    assert out.returncode == 0, out.stdout + out.stderr + robot.agent.log()[-3000:]
    golden = robot.data_dir / "models" / name / "versions" / "1.0.0" / "golden.npz"
    with np.load(golden) as z:
        feeds = {k[len("input.") :]: z[k] for k in z.files if k.startswith("input.")}
        expected = {k[len("output.") :]: z[k] for k in z.files if k.startswith("output.")}
    with ModelRuntime(name, robot.data_dir, report=False) as rt:
        assert rt.version == "1.0.0"
        got = rt.infer(feeds)
    for out_name, want in expected.items():
        np.testing.assert_allclose(got[out_name], want, rtol=1e-3, atol=1e-3)
