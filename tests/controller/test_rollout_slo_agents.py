"""SLO bakes with REAL agents, a real robot-side service and real telemetry.

Three robots on a real Mosquitto run `python -m agent.cli run`; on each, a service
process (tests/controller/robot_service.py) runs `detector` through the runtime library
on a stream of live frames and records its confidence with `rt.gauge`; the agents send
it in telemetry every 0.25 s and a real TelemetryIngester stores it where `jetfleet
rollout` reads it. Version 2.0.0 is the same network with its logits scaled down: it
matches its golden outputs exactly (every robot's own gate passes) but is far less
confident on the live frames. The first wave switches, the bake catches it, the rollout
aborts and the wave rolls back. The same rollout of an unchanged 2.0.1 completes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fleet import AgentFleet, agent_lab, rollout_start, start_agents, wait_until
from onnx import numpy_helper

from controller.telemetry.ingest import TelemetryIngester
from protocol.keys import SigningKey

pytestmark = pytest.mark.slow

DEVICES = ("robot-a", "robot-b", "robot-c")
GATE = {"probation_s": 0, "max_regression_pct": 100}
SLO = "confidence_mean >= -2%"
SERVICE = Path(__file__).with_name("robot_service.py")


def mlp_bundle(out: Path, release: SigningKey, version: str, logit_scale: float) -> Path:
    """The tests' MLP (64 → 128 → 16) with its last layer scaled: same argmax, flatter
    softmax. Its golden outputs are its own, so the agent's accuracy gate passes."""
    from models import make_golden, make_mlp, mlp_inputs, write_golden

    from protocol.bundle import bundle_filename, make_manifest, write_bundle

    work = out / f"src-{version}"
    work.mkdir(parents=True, exist_ok=True)
    path = make_mlp(work / "model.onnx")
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name in ("w1", "b1"):  # the output layer
            scaled = numpy_helper.to_array(init) * np.float32(logit_scale)
            init.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), init.name))
    onnx.save(model, str(path))
    golden = write_golden(work / "golden.npz", make_golden(path, mlp_inputs(4, seed=1)))
    files = {"model.onnx": path, "golden.npz": golden}
    manifest = make_manifest(
        name="detector",
        version=version,
        files=files,
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": ["batch", 16]}],
        gate=GATE,
    )
    return write_bundle(out / bundle_filename("detector", version), manifest, files, [release])


class Fleet(AgentFleet):
    def rollout(self, version: str, logit_scale: float) -> dict:  # type: ignore[type-arg]
        bundle = mlp_bundle(self.root / "build", self.keys.release, version, logit_scale)
        out = self.jetfleet(
            *rollout_start(bundle, "all", "1,100%", "--canary", "robot-a"),
            *("--slo", SLO, "--slo", "inference_errors == 0", "--bake", "3s", "--bake-max", "8s"),
            *("--wait", "--output", "json"),
        )
        assert out.returncode in (0, 1), out.stdout + out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("slo")
    with agent_lab(root) as (keys, broker, env):
        ingester = TelemetryIngester(root / "data" / "telemetry.db", broker.url, idle_wait_s=0.01)
        ingester.start()
        agents, services = [], []
        try:
            agents = start_agents(root, broker.url, DEVICES, telemetry_interval_s=0.25)
            f = Fleet(env, keys, root)
            wait_until(lambda: len(f.actives()) == 3, timeout=60, what="three agents online")
            v1 = mlp_bundle(root / "build", keys.release, "1.0.0", 1.0)
            out = f.jetfleet(*rollout_start(v1, "all", "100%", "--wait"))
            assert out.returncode == 0, out.stdout + out.stderr + agents[0].log()[-2000:]
            for i, d in enumerate(DEVICES):
                services.append(
                    subprocess.Popen(
                        [sys.executable, str(SERVICE), str(root / d / "data"), str(i)],
                        env={**env, "OMP_NUM_THREADS": "1"},
                    )
                )
            time.sleep(4)  # history on the old version: each robot's own past
            yield f
        finally:
            for s in services:
                s.terminate()
                s.wait(timeout=10)
            for a in agents:
                a.stop()
            ingester.stop()


def test_a_version_less_confident_on_live_frames_is_caught_in_the_bake_and_rolled_back(
    fleet: Fleet,
) -> None:
    data = fleet.rollout("2.0.0", logit_scale=0.3)
    assert data["rollout"]["state"] == "aborted", data["rollout"]
    states = {d["device_id"]: d["state"] for d in data["devices"]}
    # The canary's own gate passed: it switched, then the bake judged it on live frames.
    assert states == {"robot-a": "SUCCEEDED", "robot-b": "WAITING", "robot-c": "WAITING"}
    assert {d["device_id"]: d["rb_state"] for d in data["devices"]}["robot-a"] == "SUCCEEDED"
    reason = data["rollout"]["abort_reason"]
    assert reason.startswith(f"wave 1 baked: SLO {SLO} FAIL: change -"), reason
    verdicts = {v["slo"]: v for v in data["slo_verdicts"]}
    conf = verdicts[SLO]
    assert conf["verdict"] == "FAIL" and conf["high"] < -0.02
    assert (conf["canary_devices"], conf["baseline_devices"]) == (1, 2)
    assert verdicts["inference_errors == 0"]["verdict"] == "PASS"
    assert fleet.actives() == dict.fromkeys(DEVICES, "1.0.0")


def test_the_same_rollout_of_an_unchanged_version_completes(fleet: Fleet) -> None:
    data = fleet.rollout("2.0.1", logit_scale=1.0)
    assert data["rollout"]["state"] == "succeeded", data["rollout"]["abort_reason"]
    got = {(v["wave"], v["slo"]): (v["verdict"], v["bake"]) for v in data["slo_verdicts"]}
    assert got == {
        (0, SLO): ("PASS", "passed"),
        (0, "inference_errors == 0"): ("PASS", "passed"),
        (1, SLO): ("PASS", "passed"),
        (1, "inference_errors == 0"): ("PASS", "passed"),
    }
    assert fleet.actives() == dict.fromkeys(DEVICES, "2.0.1")
    status = fleet.jetfleet("rollout", "status")
    assert f"SLO wave 2 (passed): {SLO} PASS" in status.stdout, status.stdout
