"""state.db when things break: corrupt, read-only, or grown by a busy month."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent import doctor
from agent.doctor import FAIL, PASS, WARN
from agent.store import JobRecord, Store
from protocol.messages import JobState
from protocol.topics import Topics
from tests.agent.harness import (
    REPO,
    AgentProcess,
    EventCollector,
    Publisher,
    build_bundle,
    engine_link_state,
    make_command,
    sign_command,
    write_agent_config,
)

DEV = "robot-5"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _config(tmp_path: Path, trust_material, broker_url: str, data: Path | None = None) -> Path:
    return write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=broker_url,
        data_dir=data or tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )


def _install(tmp_path: Path, trust_material, cfg: Path) -> None:
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    done = _cli("install", str(bundle), "--config", str(cfg))
    assert done.returncode == 0, done.stderr


def _corrupt(db: Path, how: str) -> None:
    raw = db.read_bytes()
    for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        side.unlink(missing_ok=True)
    db.write_bytes(os.urandom(len(raw)) if how == "random" else raw[: len(raw) // 2])


@contextmanager
def read_only_mount(src: Path, dst: Path) -> Iterator[Path]:
    """`src` seen through a real read-only bind mount (root only; chmod means nothing to root)."""
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        pytest.skip("needs root and mount(8) for a read-only bind mount")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)
        yield dst
    finally:
        if subprocess.run(["umount", str(dst)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(dst)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["random", "truncated"])
def test_a_corrupt_state_db_is_moved_aside_and_the_agent_starts_fresh(
    tmp_path: Path, mosquitto, trust_material, how: str
) -> None:
    cfg = _config(tmp_path, trust_material, mosquitto.url)
    data = tmp_path / "data"
    _install(tmp_path, trust_material, cfg)
    # A command signed before the reset: afterwards the device cannot tell it from a replay.
    old = make_command(DEV, "ping")
    old_env = sign_command(old, trust_material.operator)
    time.sleep(0.05)
    _corrupt(data / "state.db", how)
    doctor_says = doctor.check_state(doctor.load_config(cfg))
    assert doctor_says.status == FAIL and "is corrupt" in doctor_says.detail
    assert "restart the agent" in doctor_says.fix
    status = _cli("status", "--config", str(cfg))
    assert status.returncode == 1 and "is corrupt" in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1 and "Traceback" not in status.stderr

    with (
        EventCollector(mosquitto.url, DEV) as events,
        Publisher(mosquitto.url) as pub,
        AgentProcess(cfg) as agent,
    ):
        online = events.wait_online()
        # What runs on the robot is read from the links, which the reset never touches.
        assert online.models["detector"].active == "1.0.0"
        assert engine_link_state(data, "detector")[0] == "1.0.0"
        events.wait(lambda: any(e.code == "state_reset" for e in events.events), 20)
        reset = next(e for e in events.events if e.code == "state_reset")
        assert reset.state is JobState.FAILED and "state.db.corrupt-" in (reset.reason or "")
        # Seq jumps past anything the lost database published (the controller drops
        # events at or below its last one).
        assert reset.seq > 10**12
        pub.publish(Topics().device_cmd(DEV), old_env)
        refused = events.wait_state(old.command_id, "REJECTED")
        assert refused.code == "state_reset" and "issue it again" in (refused.reason or "")
        new = make_command(DEV, "ping")
        pub.publish(Topics().device_cmd(DEV), sign_command(new, trust_material.operator))
        assert events.wait_state(new.command_id, "SUCCEEDED").seq > reset.seq
        assert agent.alive()
    log = agent.log()
    assert "Traceback" not in log
    assert len([line for line in log.splitlines() if "event='state_reset'" in line]) == 1
    kept = [p.name for p in data.iterdir() if p.name.startswith("state.db.corrupt-")]
    assert kept, list(data.iterdir())
    after = doctor.check_state(doctor.load_config(cfg))
    assert after.status == WARN and kept[0] in after.detail


@pytest.mark.slow
def test_status_and_doctor_work_on_a_read_only_data_dir(
    tmp_path: Path, trust_material, mosquitto
) -> None:
    writable = tmp_path / "data"
    _install(tmp_path, trust_material, _config(tmp_path, trust_material, mosquitto.url))
    with read_only_mount(writable, tmp_path / "ro") as ro:
        cfg = _config(tmp_path, trust_material, mosquitto.url, data=ro)
        human = _cli("status", "--config", str(cfg))
        assert human.returncode == 0, human.stderr
        assert "model detector: active 1.0.0" in human.stdout
        assert "trust root version 1" in human.stdout
        shown = json.loads(_cli("status", "--config", str(cfg), "--output", "json").stdout)
        assert shown["trust_version"] == 1 and shown["recent_jobs"][0]["state"] == "SUCCEEDED"
        config = doctor.load_config(cfg)
        disk = doctor.check_disk(config)
        assert disk.status == FAIL and "read-only file system" in disk.detail
        assert "remount it read-write" in disk.fix
        assert doctor.check_state(config).status == PASS


@pytest.mark.slow
def test_a_busy_month_of_jobs_is_bounded_by_count_at_agent_start(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _config(tmp_path, trust_material, mosquitto.url)
    store = Store(tmp_path / "data" / "state.db")
    with store.tx() as db:
        for i in range(1300):
            job = JobRecord(f"cid-{i}", "ping", JobState.SUCCEEDED, None, None, None, None)
            store.insert_job(db, job)
    store.close()
    with EventCollector(mosquitto.url, DEV) as events, AgentProcess(cfg):
        events.wait_online()
    store = Store(tmp_path / "data" / "state.db", readonly=True)
    try:
        assert store.job_count() == 1000
        assert store.recent_jobs(1)[0].command_id == "cid-1299"
    finally:
        store.close()


def test_a_quiet_device_keeps_its_last_jobs_and_forgets_older_ones(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    with store.tx() as db:
        for i in range(30):
            store.insert_job(db, JobRecord(f"c{i}", "ping", JobState.SUCCEEDED, *[None] * 4))
        store.insert_job(db, JobRecord("live", "deploy", JobState.QUEUED, *[None] * 4))
    two_months_on = time.time() + 60 * 86400
    assert store.prune_jobs(two_months_on, min_keep=5) == 25
    assert store.job("live") is not None and store.job("c29") is not None
    assert store.job("c24") is None and store.job_count() == 6
    store.close()
