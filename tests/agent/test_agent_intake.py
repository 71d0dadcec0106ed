"""Command intake under pressure, on a REAL agent and a real Mosquitto: a cancel that
arrives before its deploy, a flood of junk, and a data directory whose disk is full."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.commands import REFUSAL_BURST
from protocol.dsse import sign
from protocol.messages import COMMAND_PAYLOAD_TYPE, JobState
from protocol.topics import Topics
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    Publisher,
    TelemetryTap,
    build_bundle,
    deploy_body,
    engine_link_state,
    make_command,
    sign_command,
    write_agent_config,
)

DEV = "robot-i"


def _agent(tmp_path: Path, broker_url: str, data: Path, trust: Path, **kw: object) -> Path:
    return write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=broker_url,
        data_dir=data,
        trust_root=trust,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def bundle(tmp_path: Path, trust_material) -> Path:
    return build_bundle(tmp_path / "build", trust_material.release, version="1.0.0")


def test_a_cancel_that_arrives_before_its_deploy_wins_and_nothing_is_installed(
    tmp_path: Path, mosquitto, trust_material, bundle: Path
) -> None:
    data = tmp_path / "data"
    cfg = _agent(tmp_path, mosquitto.url, data, trust_material.write(tmp_path / "trust.json"))
    deploy = make_command(DEV, "deploy", deploy_body(bundle))
    cancel = make_command(DEV, "cancel", {"command_id": deploy.command_id})
    topic = Topics().device_cmd(DEV)
    with (
        EventCollector(mosquitto.url, DEV) as events,
        AgentProcess(cfg),
        Publisher(mosquitto.url) as pub,
    ):
        events.wait_online()
        # The deploy was held up (a full disk, a broker): its cancel comes first.
        pub.publish(topic, sign_command(cancel, trust_material.operator))
        assert events.wait_terminal(cancel.command_id).state is JobState.SUCCEEDED
        pub.publish(topic, sign_command(deploy, trust_material.operator))
        final = events.wait_terminal(deploy.command_id)
    assert (final.state, final.code) == (JobState.CANCELED, "canceled"), final
    assert cancel.command_id in (final.reason or "")
    assert events.states(deploy.command_id) == ["RECEIVED", "CANCELED"]
    assert engine_link_state(data, "detector") == (None, None)


@pytest.mark.slow
def test_a_flood_of_junk_is_refused_within_a_budget_and_counted_in_telemetry(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _agent(
        tmp_path,
        mosquitto.url,
        tmp_path / "data",
        trust_material.write(tmp_path / "trust.json"),
        telemetry_interval_s=1.0,
    )
    flood = 300
    topic = Topics().device_cmd(DEV)
    tap = TelemetryTap(mosquitto.url, DEV)
    try:
        with (
            EventCollector(mosquitto.url, DEV) as events,
            AgentProcess(cfg) as agent,
            Publisher(mosquitto.url) as pub,
        ):
            events.wait_online()
            for _ in range(flood):  # each with a fresh, real-looking command id, unsigned
                junk = sign(make_command(DEV, "ping").encode(), COMMAND_PAYLOAD_TYPE, [])
                pub.client.publish(topic, junk.encode(), qos=1)
            probe = make_command(DEV, "ping")
            pub.publish(topic, sign_command(probe, trust_material.operator))
            events.wait_state(probe.command_id, "SUCCEEDED", timeout=60)
            sample = tap.wait(lambda s: (s.jobs.refused or 0) >= flood)
            assert agent.alive()
        refusals = [e for e in events.events if e.refused_sha256]
        assert 0 < len(refusals) <= REFUSAL_BURST + 2, len(refusals)
        assert (sample.jobs.refused_unreported or 0) >= flood - len(refusals) - 2
        # The probe's own events came right after the flood: nothing queued ahead of them.
        assert events.states(probe.command_id) == ["RECEIVED", "SUCCEEDED"]
    finally:
        tap.close()


# -- a full disk -------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs for the agent's data directory (we fill it for real)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk: Path) -> Path:
    """Write zeros until the filesystem has not one block left."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"\0" * block) == block:
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_a_full_disk_holds_commands_says_disk_full_and_the_cancel_wins_once_space_returns(
    tmp_path: Path, mosquitto, trust_material, bundle: Path, small_disk: Path
) -> None:
    data = small_disk / "data"
    # A reserve that fits the small disk: left alone, the deploy would install.
    cfg = _agent(
        tmp_path,
        mosquitto.url,
        data,
        trust_material.write(tmp_path / "trust.json"),
        extra={"limits": {"min_free_disk_mb": 1}},
    )
    deploy = make_command(DEV, "deploy", deploy_body(bundle))
    cancel = make_command(DEV, "cancel", {"command_id": deploy.command_id})
    topic = Topics().device_cmd(DEV)
    with (
        EventCollector(mosquitto.url, DEV) as events,
        AgentProcess(cfg) as agent,
        Publisher(mosquitto.url) as pub,
    ):
        events.wait_online()
        filler = _fill(small_disk)
        # An aborting controller's deploy, then its cancel, both while state.db is stuck.
        pub.publish(topic, sign_command(deploy, trust_material.operator))
        pub.publish(topic, sign_command(cancel, trust_material.operator))
        status = events.wait_status(lambda s: s.fault is not None, timeout=30)
        assert status.fault is not None and status.fault.code == "disk_full", status
        assert "state.db cannot be written" in status.fault.reason
        assert events.for_command(deploy.command_id) == []  # nothing half-stored

        filler.unlink()  # space returns; no restart, no reconnect
        final = events.wait_terminal(deploy.command_id, timeout=60)
        assert (final.state, final.code) == (JobState.CANCELED, "canceled"), (
            final,
            agent.log()[-3000:],
        )
        received = events.for_command(deploy.command_id)[0]
        assert (received.state, received.code) == (JobState.RECEIVED, "disk_full"), received
        assert events.wait_terminal(cancel.command_id).state is JobState.SUCCEEDED
        events.wait_status(lambda s: s.fault is None and s.job is None, timeout=30)
        assert agent.alive()
    assert engine_link_state(data, "detector") == (None, None)
