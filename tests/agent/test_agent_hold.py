"""Robot-aware activation on a real agent and a real Mosquitto (issue 14): the busy lock and
maintenance windows hold a gated job ON_HOLD while the old engine keeps serving.

The holders are real: the runtime library's `rt.busy()` in another process, and
`flock(1)` for a program that knows nothing of jetfleet. The window test moves the agent's
clock through its test-only JETFLEET_AGENT_TEST_CLOCK_FILE.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.busy import BusyLock
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
    write_agent_config,
)

DEV = "robot-h"
pytestmark = pytest.mark.xdist_group("test_agent_hold")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, trust_material):
    """detector 1.0.0 active (offline install), and signed 1.1.0 and 1.2.0 bundles."""
    root = tmp_path_factory.mktemp("hold-base")
    trust = trust_material.write(root / "trust.json")
    cfg = write_agent_config(root / "agent.toml", device_id=DEV, broker_url="mqtt://127.0.0.1:1",
                             data_dir=root / "data", trust_root=trust)  # fmt: skip
    v1 = build_bundle(root, trust_material.release, version="1.0.0")
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "install", str(v1), "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    bundles = {v: build_bundle(root, trust_material.release, version=v) for v in ("1.1.0", "1.2.0")}
    return root, trust, bundles


def _setup(baseline, tmp_path: Path, mosquitto, **activation: Any) -> tuple[Path, Path]:
    root, trust, _ = baseline
    data = tmp_path / "data"
    shutil.copytree(root / "data", data, symlinks=True)
    cfg = write_agent_config(tmp_path / "agent.toml", device_id=DEV, broker_url=mosquitto.url,
                             data_dir=data, trust_root=trust,
                             extra={"activation": activation})  # fmt: skip
    return cfg, data


def _deploy(mosquitto, trust_material, bundle: Path) -> str:
    cmd = make_command(DEV, "deploy", deploy_body(bundle))
    publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
    return cmd.command_id


def _held(events: EventCollector, cid: str, code: str) -> Any:
    events.wait(
        lambda: any(e.state.value == "ON_HOLD" and e.code == code for e in events.for_command(cid)),
        60,
        f"ON_HOLD {code}",
    )
    return [e for e in events.for_command(cid) if e.state.value == "ON_HOLD"][-1]


def _runtime_holder(data: Path, reason: str) -> subprocess.Popen[str]:
    """The robot's own service: loads the active engine through the runtime library and
    holds the busy lock until its stdin closes."""
    code = (
        "import sys\nfrom agent.runtime import ModelRuntime\n"
        f"rt = ModelRuntime('detector', {str(data)!r}, report=False)\n"
        f"with rt.busy({reason!r}):\n    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None
    while (line := p.stdout.readline()) and line.strip() != "held":  # past the runtime's log
        pass
    assert line.strip() == "held", "the holder exited"
    return p


def test_a_busy_robot_switches_only_when_its_mission_lets_go(
    baseline, tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg, data = _setup(baseline, tmp_path, mosquitto)
    mission = _runtime_holder(data, "mission 42")
    try:
        with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg) as agent:
            events.wait_online()
            cid = _deploy(mosquitto, trust_material, baseline[2]["1.1.0"])
            held = _held(events, cid, "busy")
            assert f"pid {mission.pid} (python" in held.reason and "mission 42" in held.reason
            assert held.gate and "p99_ms" in held.gate  # gated before it waits
            time.sleep(1.5)  # still held: the old engine serves, nothing switched
            assert events.states(cid)[-1] == "ON_HOLD", agent.log()[-2000:]
            assert engine_link_state(data, "detector") == ("1.0.0", None)
            assert events.last_status().job.state.value == "ON_HOLD"  # type: ignore[union-attr]
            mission.stdin.close()  # type: ignore[union-attr]  # the mission ends
            mission.wait(10)
            final = events.wait_terminal(cid, timeout=60)
            assert final.state.value == "SUCCEEDED", (final, agent.log()[-2000:])
            assert events.states(cid)[-4:] == ["ON_HOLD", "ACTIVATING", "PROBATION", "SUCCEEDED"]
        assert engine_link_state(data, "detector") == ("1.1.0", "1.0.0")
    finally:
        mission.kill()


@pytest.mark.slow  # the full suite runs it on 3.10
def test_a_dead_holder_blocks_nothing_and_one_held_past_the_deadline_defers(
    baseline, tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg, data = _setup(baseline, tmp_path, mosquitto, busy_timeout_s=8)
    lock = data / "run" / "busy.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)

    def flock_holder() -> subprocess.Popen[bytes]:
        # A program that knows nothing of jetfleet: flock(1) holds the lock for `sleep`.
        p = subprocess.Popen(["flock", "--shared", str(lock), "sleep", "600"],
                             start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 20
        while not BusyLock(lock).holders():
            assert time.monotonic() < deadline, "flock never took the lock"
            time.sleep(0.05)
        return p

    with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg) as agent:
        events.wait_online()
        holder = flock_holder()
        cid = _deploy(mosquitto, trust_material, baseline[2]["1.1.0"])
        assert "(flock)" in _held(events, cid, "busy").reason
        os.killpg(holder.pid, signal.SIGKILL)  # the holder dies (kill -9), never unlocks
        holder.wait()
        final = events.wait_terminal(cid, timeout=60)
        assert final.state.value == "SUCCEEDED", (final, agent.log()[-2000:])

        holder = flock_holder()  # busy for good this time
        try:
            cid = _deploy(mosquitto, trust_material, baseline[2]["1.2.0"])
            _held(events, cid, "busy")
            final = events.wait_terminal(cid, timeout=60)
        finally:
            os.killpg(holder.pid, signal.SIGKILL)
        assert final.state.value == "DEFERRED" and final.code == "busy", final
        assert "still busy after" in (final.reason or "") and "(flock)" in (final.reason or "")
        assert "ACTIVATING" not in events.states(cid)
    assert engine_link_state(data, "detector") == ("1.1.0", "1.0.0")
    assert not list((data / "downloads").glob("*.jfb"))  # a deferred job leaves nothing


def _set_clock(path: Path, when: datetime) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(when.isoformat())
    os.replace(tmp, path)


def test_a_window_holds_activation_across_kill9_until_the_clock_enters_it(
    baseline, tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg, data = _setup(baseline, tmp_path, mosquitto, windows=["Mon 22:00-23:00"],
                       timezone="UTC")  # fmt: skip
    clock = tmp_path / "clock"
    _set_clock(clock, datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc))  # Monday noon
    env = {"JETFLEET_AGENT_TEST_CLOCK_FILE": str(clock)}
    with EventCollector(mosquitto.url, DEV) as events:
        agent = AgentProcess(cfg, env=env).start()
        try:
            events.wait_online()
            cid = _deploy(mosquitto, trust_material, baseline[2]["1.1.0"])
            held = _held(events, cid, "window")
            assert "Mon 22:00-23:00 (UTC)" in held.reason and "2026-12-07T22:00" in held.reason
            agent.kill9()  # waiting is resumable: the restart goes on waiting

            def after_restart() -> list[str]:  # a resent event keeps its seq
                return [e.state.value for e in events.for_command(cid) if e.seq > held.seq]

            agent = AgentProcess(cfg, env=env).start()
            events.wait(lambda: bool(after_restart()), 60, "ON_HOLD again")
            time.sleep(1.0)
            assert after_restart() == ["ON_HOLD"], agent.log()[-2000:]  # not built again
            assert engine_link_state(data, "detector") == ("1.0.0", None)
            _set_clock(clock, datetime(2026, 12, 7, 22, 0, 5, tzinfo=timezone.utc))
            final = events.wait_terminal(cid, timeout=60)
            assert final.state.value == "SUCCEEDED", (final, agent.log()[-2000:])
        finally:
            agent.stop()
    assert engine_link_state(data, "detector") == ("1.1.0", "1.0.0")


def test_a_held_job_does_not_hold_the_worker_and_a_staged_one_can_be_canceled(
    baseline, tmp_path: Path, mosquitto, trust_material
) -> None:
    """While 1.1.0 waits ON_HOLD for its window, a later deploy builds and gates (here up
    to STAGED) instead of queueing behind it; a cancel ends the STAGED job at once."""
    cfg, data = _setup(baseline, tmp_path, mosquitto, windows=["Mon 22:00-23:00"],
                       timezone="UTC")  # fmt: skip
    clock = tmp_path / "clock"
    _set_clock(clock, datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc))  # Monday noon
    op = trust_material.operator
    env = {"JETFLEET_AGENT_TEST_CLOCK_FILE": str(clock)}
    with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg, env=env) as agent:
        events.wait_online()
        held = _deploy(mosquitto, trust_material, baseline[2]["1.1.0"])
        _held(events, held, "window")
        later = make_command(DEV, "deploy", deploy_body(baseline[2]["1.2.0"], stage=True))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(later, op))
        events.wait_state(later.command_id, "STAGED", timeout=60)
        assert events.states(held)[-1] == "ON_HOLD"
        # The status names the held job once the worker is idle again.
        events.wait_status(lambda s: s.job is not None and s.job.command_id == held)
        cancel = make_command(DEV, "cancel", {"command_id": later.command_id})
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cancel, op))
        ended = events.wait_terminal(later.command_id, timeout=30)
        assert (ended.state.value, ended.code) == ("CANCELED", "canceled"), agent.log()[-2000:]
        _set_clock(clock, datetime(2026, 12, 7, 22, 0, 5, tzinfo=timezone.utc))
        final = events.wait_terminal(held, timeout=60)
        assert final.state.value == "SUCCEEDED", (final, agent.log()[-2000:])
        holds = [e for e in events.for_command(held) if e.state.value == "ON_HOLD"]
        assert len(holds) == 1  # parked and polled, reported once: nothing new to say
    assert engine_link_state(data, "detector") == ("1.1.0", "1.0.0")


def test_a_staged_version_waits_with_the_old_engine_serving_across_kill9_then_switches(
    baseline, tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg, data = _setup(baseline, tmp_path, mosquitto)
    op = trust_material.operator
    with EventCollector(mosquitto.url, DEV) as events:
        agent = AgentProcess(cfg).start()
        try:
            events.wait_online()
            t0 = time.monotonic()
            cmd = make_command(DEV, "deploy", deploy_body(baseline[2]["1.1.0"], stage=True))
            publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, op))
            staged = events.wait_state(cmd.command_id, "STAGED", timeout=60)
            stage_s = time.monotonic() - t0
            assert staged.gate and "p99_ms" in staged.gate and "1.0.0 serves" in staged.reason
            assert engine_link_state(data, "detector") == ("1.0.0", None)
            # Only a STAGED job can be activated: the activate of a ping is refused.
            ping = make_command(DEV, "ping")
            publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(ping, op))
            events.wait_state(ping.command_id, "SUCCEEDED")
            bad = make_command(DEV, "activate", {"command_id": ping.command_id})
            publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(bad, op))
            refused = events.wait_terminal(bad.command_id)
            assert (refused.state.value, refused.code) == ("REJECTED", "not_staged")

            agent.kill9()  # a staged engine survives a restart
            agent = AgentProcess(cfg).start()
            events.wait_status(lambda s: s.online and s.job is None)
            time.sleep(1.0)
            assert events.states(cmd.command_id)[-1] == "STAGED"
            assert engine_link_state(data, "detector") == ("1.0.0", None)

            t1 = time.monotonic()
            go = make_command(DEV, "activate", {"command_id": cmd.command_id})
            publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(go, op))
            final = events.wait_terminal(cmd.command_id, timeout=60)
            switch_s = time.monotonic() - t1
            assert final.state.value == "SUCCEEDED", (final, agent.log()[-2000:])
            assert events.wait_terminal(go.command_id).state.value == "SUCCEEDED"
            after = events.states(cmd.command_id)
            assert after[after.index("STAGED") :] == ["STAGED", "ACTIVATING", "PROBATION",
                                                      "SUCCEEDED"]  # fmt: skip
            print(f"stage (download, build, gate) {stage_s:.2f}s; activate to SUCCEEDED "
                  f"{switch_s:.2f}s")  # fmt: skip
        finally:
            agent.stop()
    assert engine_link_state(data, "detector") == ("1.1.0", "1.0.0")


@pytest.mark.slow  # the full suite runs it on 3.10
def test_a_staged_version_never_activated_is_cleaned_up_after_its_ttl(
    baseline, tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg, data = _setup(baseline, tmp_path, mosquitto, stage_ttl_s=2)
    bundle = baseline[2]["1.1.0"]
    with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg) as agent:
        events.wait_online()
        cmd = make_command(DEV, "deploy", deploy_body(bundle, stage=True))
        publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
        events.wait_state(cmd.command_id, "STAGED", timeout=60)
        sha = deploy_body(bundle)["sha256"]
        assert (data / "bundles" / sha).is_dir()
        final = events.wait_terminal(cmd.command_id, timeout=30)
        assert (final.state.value, final.code) == ("CANCELED", "stage_expired"), agent.log()[-2000:]
    assert not (data / "bundles" / sha).exists()
    assert engine_link_state(data, "detector") == ("1.0.0", None)
