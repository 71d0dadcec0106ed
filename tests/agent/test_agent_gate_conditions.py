"""A real agent's speed gate on a (recorded) Jetson whose GPU clock moves mid-gate.

The agent reads the Jetson's files under `[gate] sysfs_root`, here a copy of the recorded
AGX Orin tree (MAXN, `jetson_clocks`: GPU pinned at 1300.5 MHz). While the deploy runs,
this test pulls the GPU clock down 1 MHz every 10 ms, as a thermal or power cap would,
rewriting `cur_freq` atomically like the kernel's single-value sysfs files.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from protocol.topics import Topics
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    build_bundle,
    deploy_body,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)

ORIN = Path(__file__).parent.parent / "fixtures" / "jetson" / "agx-orin-r36.4.0"
GPU_CUR = "sys/class/devfreq/17000000.gpu/cur_freq"

pytestmark = pytest.mark.slow


class SaggingClock:
    """Lowers the GPU's cur_freq by 1 MHz every 10 ms until stopped (then it holds)."""

    def __init__(self, root: Path) -> None:
        self.path = root / GPU_CUR
        self.mhz = 1300.5
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.01) and self.mhz > 306:
            self.mhz -= 1
            tmp = self.path.with_name(".cur_freq.tmp")
            tmp.write_text(f"{int(self.mhz * 1e6)}\n")
            os.replace(tmp, self.path)

    def __enter__(self) -> SaggingClock:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)


def _agent(tmp_path: Path, mosquitto, trust_material, **gate: object) -> tuple[Path, Path]:
    root = tmp_path / "jetson"
    shutil.copytree(ORIN, root)
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-1",
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
        health="true",
        extra={"gate": {"sysfs_root": str(root), **gate}},
    )
    return cfg, root


def _deploy(mosquitto, trust_material, bundle: Path) -> str:
    cmd = make_command("robot-1", "deploy", deploy_body(bundle))
    publish(
        mosquitto.url, Topics().device_cmd("robot-1"), sign_command(cmd, trust_material.operator)
    )
    return cmd.command_id


def _not_judged(events: EventCollector, cid: str) -> list[str]:
    return [
        e.reason or ""
        for e in events.for_command(cid)
        if e.state.value == "VALIDATING" and e.code == "not_judged"
    ]


def test_a_clock_change_mid_gate_is_not_judged_and_the_stable_rerun_is(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg, root = _agent(tmp_path, mosquitto, trust_material, retry_wait_s=1.0)
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    with EventCollector(mosquitto.url, "robot-1") as events, AgentProcess(cfg) as agent:
        events.wait_online()
        cid = _deploy(mosquitto, trust_material, bundle)
        events.wait_state(cid, "BUILDING")
        with SaggingClock(root):
            events.wait(lambda: bool(_not_judged(events, cid)), 60, "a not_judged event")
        # The clock now holds still (lower than before): the rerun is judged.
        final = events.wait_terminal(cid, timeout=90)
        assert final.state.value == "SUCCEEDED", (final, agent.log()[-3000:])
    (first,) = _not_judged(events, cid)
    assert re.fullmatch(
        r"not judged: clocks changed \(gpu [\d.]+ -> [\d.]+ MHz\); "
        r"measuring again in 1 s \(run 1 of 3\)",
        first,
    ), first
    assert final.gate is not None and final.gate["speed_attempts"] == 2
    after = final.gate["speed"]["conditions"]["after"]
    assert after["power_mode"] == "MAXN" and after["gpu"]["cur"] < 1300.5


def test_clocks_that_keep_moving_end_the_job_not_judged_within_the_run_limit(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg, root = _agent(tmp_path, mosquitto, trust_material, speed_attempts=2, retry_wait_s=0.2)
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    with EventCollector(mosquitto.url, "robot-1") as events, AgentProcess(cfg) as agent:
        events.wait_online()
        cid = _deploy(mosquitto, trust_material, bundle)
        events.wait_state(cid, "BUILDING")
        with SaggingClock(root):
            final = events.wait_terminal(cid, timeout=90)
        assert final.state.value == "FAILED", (final, agent.log()[-3000:])
        status = events.wait_status(lambda s: s.job is None)
    assert final.code == "not_judged"
    assert final.reason is not None and final.reason.startswith("no engine stays active: not ")
    assert "in each of 2 speed runs; no verdict on the model" in final.reason
    runs = _not_judged(events, cid)
    assert len(runs) == 2 and runs[-1].endswith("no runs left (run 2 of 2)")
    assert "detector" not in status.models or status.models["detector"].active is None
