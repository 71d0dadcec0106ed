"""The job state machine in-process: the same Store, CommandProcessor and Worker the
daemon wires, driven synchronously so each behaviour is checked step by step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from agent.commands import CommandProcessor
from agent.config import load_config
from agent.journal import Journal
from agent.store import Store
from agent.truststore import TrustStore
from agent.worker import Worker
from protocol.keys import SigningKey
from protocol.messages import JobEvent, JobState
from protocol.topics import Topics
from protocol.trust import build_trust_root
from tests.agent.harness import (
    build_bundle,
    deploy_body,
    engine_link_state,
    make_command,
    sign_command,
    tmp_leftovers,
    write_agent_config,
)

DEV = "robot-5"


class Device:
    """An agent without the network: commands in, events out of the outbox table."""

    def __init__(self, tmp: Path, trust_material, live=None, **cfg_kw) -> None:
        self.tmp = tmp
        self.tm = trust_material
        self.data = tmp / "data"
        self.config = load_config(
            write_agent_config(
                tmp / "agent.toml",
                device_id=DEV,
                groups=["yard"],
                broker_url="mqtt://127.0.0.1:1",
                data_dir=self.data,
                trust_root=trust_material.write(tmp / "trust.json"),
                **cfg_kw,
            )
        )
        self.store = Store(self.data / "state.db")
        self.journal = Journal(self.store, Topics(), DEV)
        self.trust = TrustStore(self.config.trust_root, self.data, datetime.now(timezone.utc))
        self.worker = Worker(self.config, self.store, self.journal, self.trust, live=live)
        self.commands = CommandProcessor(
            self.store,
            self.journal,
            self.trust,
            device_id=DEV,
            groups=["yard"],
            wake_worker=lambda: None,
            on_cancel=self.worker.cancel,
        )

    def send(self, kind: str, body: dict | None = None, **kw) -> str:
        cmd = make_command(DEV, kind, body, **kw)
        self.commands.process(sign_command(cmd, self.tm.operator))
        return cmd.command_id

    def run(self, command_id: str) -> JobEvent:
        job = self.store.job(command_id)
        assert job is not None
        if not job.state.terminal:
            self.worker.run_job(job)
        return self.events(command_id)[-1]

    def deploy(self, bundle: Path, **body) -> JobEvent:
        return self.run(self.send("deploy", deploy_body(bundle, **body)))

    def events(self, command_id: str | None = None) -> list[JobEvent]:
        rows = self.store.outbox_after(0, limit=100_000)
        evs = [JobEvent.decode(p) for _, _, p in rows]
        return [e for e in evs if command_id is None or e.command_id == command_id]

    def states(self, command_id: str) -> list[str]:
        out: list[str] = []
        for e in self.events(command_id):
            if not out or out[-1] != e.state.value:
                out.append(e.state.value)
        return out

    def slot(self, model: str = "detector") -> tuple[str | None, str | None]:
        return engine_link_state(self.data, model)


@pytest.fixture
def device(tmp_path: Path, trust_material) -> Device:
    return Device(tmp_path, trust_material)


def test_upgrade_keeps_old_version_as_previous(device: Device) -> None:
    v1 = build_bundle(device.tmp, device.tm.release, version="1.0.0")
    v2 = build_bundle(device.tmp, device.tm.release, version="1.1.0", seed=3)
    assert device.deploy(v1).state is JobState.SUCCEEDED
    e = device.deploy(v2)
    assert e.state is JobState.SUCCEEDED, e
    assert device.slot() == ("1.1.0", "1.0.0")
    assert tmp_leftovers(device.data) == []
    seqs = [ev.seq for ev in device.events()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_deploy_of_lower_version_is_rejected_as_downgrade(device: Device) -> None:
    v2 = build_bundle(device.tmp, device.tm.release, version="2.0.0")
    v1 = build_bundle(device.tmp, device.tm.release, version="1.9.9")
    device.deploy(v2)
    e = device.deploy(v1)
    assert (e.state, e.code) == (JobState.REJECTED, "downgrade")
    assert "rollback" in (e.reason or "")
    assert device.slot() == ("2.0.0", None)


def test_signed_rollback_returns_to_held_lower_version(device: Device) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.1.0", seed=2))
    cid = device.send("rollback", {"model": "detector", "to_version": "1.0.0"})
    e = device.run(cid)
    assert e.state is JobState.SUCCEEDED
    assert device.states(cid) == ["RECEIVED", "QUEUED", "ACTIVATING", "SUCCEEDED"]
    assert device.slot() == ("1.0.0", "1.1.0")


def test_rollback_to_version_not_held_is_rejected(device: Device) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    e = device.run(device.send("rollback", {"model": "detector", "to_version": "0.9.0"}))
    assert (e.state, e.code) == (JobState.REJECTED, "unknown_version")
    assert "held: 1.0.0" in (e.reason or "")


def test_gate_accuracy_failure_rolls_back_and_old_engine_stays_active(device: Device) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    wrong = {"output.y": np.full((4, 16), 7.0, dtype=np.float32)}
    bad = build_bundle(device.tmp, device.tm.release, version="1.1.0", golden_override=wrong)
    e = device.deploy(bad)
    assert (e.state, e.code) == (JobState.ROLLED_BACK, "accuracy")
    assert e.gate is not None and "1.0.0 stays active" in (e.reason or "")
    assert "ACTIVATING" not in [ev.state.value for ev in device.events(e.command_id)]
    assert device.slot() == ("1.0.0", None)
    assert not (device.data / "models/detector/versions/1.1.0").exists()


def test_tampered_bundle_is_rejected_and_nothing_is_installed(device: Device) -> None:
    bundle = build_bundle(device.tmp, device.tm.release, version="1.0.0")
    raw = bytearray(bundle.read_bytes())
    raw[-2000] ^= 0xFF  # inside the last member's data
    bundle.write_bytes(bytes(raw))
    e = device.deploy(bundle)
    assert e.state is JobState.REJECTED and e.code == "bundle_invalid", e
    assert device.slot() == (None, None)
    assert tmp_leftovers(device.data) == [] and not any((device.data / "bundles").iterdir())


def test_bundle_signed_by_operator_key_is_rejected_as_wrong_role(device: Device) -> None:
    bundle = build_bundle(device.tmp, device.tm.operator, version="1.0.0")
    e = device.deploy(bundle)
    assert (e.state, e.code) == (JobState.REJECTED, "wrong_role")


def test_bundle_sha_mismatch_with_command_is_rejected(device: Device) -> None:
    bundle = build_bundle(device.tmp, device.tm.release, version="1.0.0")
    body = deploy_body(bundle)
    body["sha256"] = "0" * 64
    e = device.run(device.send("deploy", body))
    assert (e.state, e.code) == (JobState.REJECTED, "bundle_invalid")


def test_bundle_larger_than_config_limit_is_rejected(tmp_path: Path, trust_material) -> None:
    device = Device(tmp_path, trust_material, extra={"limits": {"max_bundle_mb": 1}})
    bundle = build_bundle(device.tmp, device.tm.release, version="1.0.0")
    body = deploy_body(bundle)
    body["size"] = 2 * 2**20
    e = device.run(device.send("deploy", body))
    assert (e.state, e.code) == (JobState.REJECTED, "too_large")


def test_failing_health_check_in_probation_restores_previous(
    tmp_path: Path, trust_material
) -> None:
    flag = tmp_path / "healthy"
    hook_log = tmp_path / "hooks"
    device = Device(
        tmp_path,
        trust_material,
        hook=f'echo "$JETFLEET_VERSION" >> {hook_log}',
        health=f'test -e {flag} || test "$JETFLEET_VERSION" = 1.0.0',
    )
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    flag.touch()
    # Healthy at activation, then the robot's service starts failing during probation.
    import threading

    threading.Timer(0.4, flag.unlink).start()
    e = device.deploy(
        build_bundle(device.tmp, device.tm.release, version="1.1.0", gate={"probation_s": 3})
    )
    assert (e.state, e.code) == (JobState.ROLLED_BACK, "health_failed"), e
    assert "1.0.0 is active again" in (e.reason or "")
    assert device.slot() == ("1.0.0", None)
    assert hook_log.read_text().split() == ["1.0.0", "1.1.0", "1.0.0"]


def test_failing_activation_hook_rolls_back(tmp_path: Path, trust_material) -> None:
    device = Device(tmp_path, trust_material, hook='test "$JETFLEET_VERSION" != 1.1.0')
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    e = device.deploy(build_bundle(device.tmp, device.tm.release, version="1.1.0"))
    assert (e.state, e.code) == (JobState.ROLLED_BACK, "hook_failed")
    assert device.slot() == ("1.0.0", None)


def test_restore_after_failed_activation_rebuilds_previous_engine_that_no_longer_loads(
    tmp_path: Path, trust_material
) -> None:
    old_engine = tmp_path / "data" / "models" / "detector" / "versions" / "1.0.0" / "engine"
    # While 1.1.0 activates, 1.0.0's engine goes bad (as a TensorRT upgrade would make
    # it), and the activation fails: going back must rebuild 1.0.0 from its bundle.
    hook = (
        'if [ "$JETFLEET_VERSION" = 1.1.0 ]; then '
        f"rm {old_engine} && printf garbage > {old_engine}; exit 1; fi"
    )
    device = Device(tmp_path, trust_material, hook=hook)
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    good = old_engine.read_bytes()
    e = device.deploy(build_bundle(device.tmp, device.tm.release, version="1.1.0", seed=2))
    assert (e.state, e.code) == (JobState.ROLLED_BACK, "hook_failed"), e
    assert device.slot() == ("1.0.0", None)
    assert old_engine.read_bytes() == good
    from agent.engines import load_engine

    load_engine(old_engine)


def test_cancel_of_queued_deploy_ends_canceled(device: Device) -> None:
    bundle = build_bundle(device.tmp, device.tm.release, version="1.0.0")
    cid = device.send("deploy", deploy_body(bundle))
    cancel = device.send("cancel", {"command_id": cid})
    assert device.events(cancel)[-1].state is JobState.SUCCEEDED
    e = device.run(cid)
    assert (e.state, e.code) == (JobState.CANCELED, "canceled")
    assert device.slot() == (None, None)


def test_cancel_of_finished_job_is_refused(device: Device) -> None:
    cid = device.send("ping")
    e = device.events(device.send("cancel", {"command_id": cid}))[-1]
    assert (e.state, e.code) == (JobState.REJECTED, "not_cancelable")


def test_trust_update_rotates_and_survives_restart(device: Device, trust_material) -> None:
    new_root, new_op = SigningKey.generate(), SigningKey.generate()
    env = build_trust_root(
        root=[new_root],
        release=[trust_material.release],
        operator=[new_op],
        version=2,
        sign_with=[trust_material.root, new_root],
    )
    cid = device.send("trust_update", {"trust_root": json.loads(env.encode())})
    assert device.events(cid)[-1].state is JobState.SUCCEEDED
    # The old operator key no longer counts; the new one does, also after a restart.
    old = device.send("ping")
    assert device.events(old)[-1].code == "bad_signature"
    restarted = TrustStore(device.config.trust_root, device.data, datetime.now(timezone.utc))
    assert restarted.root.version == 2


def test_trust_update_not_signed_by_old_root_is_rejected(device: Device, trust_material) -> None:
    rogue = SigningKey.generate()
    env = build_trust_root(
        root=[rogue], release=[rogue], operator=[rogue], version=5, sign_with=[rogue]
    )
    cid = device.send("trust_update", {"trust_root": json.loads(env.encode())})
    e = device.events(cid)[-1]
    assert (e.state, e.code) == (JobState.REJECTED, "trust_root")
    assert device.trust.root.version == 1


def test_seq_survives_restart_of_the_store(device: Device) -> None:
    device.send("ping")
    last = device.store.last_seq()
    device.store.close()
    store = Store(device.data / "state.db")
    assert store.last_seq() == last
    with store.tx() as db:
        assert store.next_seq(db) == last + 1


def test_expired_command_is_not_remembered_but_valid_one_is(device: Device) -> None:
    past = datetime.now(timezone.utc) - timedelta(hours=1)
    cid = device.send("ping", issued_at=past, ttl_s=10)
    assert not device.store.seen(cid)
    ok = device.send("ping")
    assert device.store.seen(ok)


def test_live_p99_over_gate_in_probation_rolls_back(tmp_path: Path, trust_material) -> None:
    from agent.livestats import LiveStats, encode_report

    sock_path = tmp_path / "live.sock"
    with LiveStats(sock_path) as live:
        device = Device(tmp_path, trust_material, live=live)
        device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
        stop = threading.Event()

        def robot_service() -> None:
            # The robot's inference service reports what it measures: 50 ms per inference,
            # far above what the gate measured for this tiny model.
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    s.sendto(encode_report("detector", "1.1.0", [50.0] * 32), str(sock_path))
                time.sleep(0.05)
            s.close()

        t = threading.Thread(target=robot_service, daemon=True)
        t.start()
        try:
            e = device.deploy(
                build_bundle(
                    device.tmp,
                    device.tm.release,
                    version="1.1.0",
                    gate={"probation_s": 5, "max_regression_pct": 20},
                )
            )
        finally:
            stop.set()
            t.join()
    assert (e.state, e.code) == (JobState.ROLLED_BACK, "probation_latency"), e
    assert e.gate is not None and e.gate["live_p99_ms"] == pytest.approx(50.0)
    # 1.0.0 had no live samples before the switch: the gate's p99 was the baseline.
    assert e.gate["probation_baseline"] == "gate"
    assert e.gate["probation_baseline_p99_ms"] == e.gate["p99_ms"]
    assert device.slot() == ("1.0.0", None)


class RobotService:
    """The robot's own inference service: the real ModelRuntime (agent/runtime.py) on
    big batches, as a busy robot runs them, reporting each latency over the real
    LiveStats socket. Its batches are 4096x the gate's golden batch, so its live p99 sits
    far above the single-threaded gate figure, like a loaded robot's."""

    def __init__(self, data_dir: Path, *, start_on: str | None = None) -> None:
        self.data_dir = data_dir
        self.start_on = start_on  # wait until `current` is this version (a restart)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        from agent.runtime import ModelRuntime
        from tests.models import mlp_inputs

        current = self.data_dir / "models" / "detector" / "current"
        try:
            while self.start_on and not self.stop.is_set():
                if os.readlink(current).endswith("/" + self.start_on):
                    break
                time.sleep(0.01)
            feeds = mlp_inputs(16384)
            with ModelRuntime("detector", self.data_dir, check_interval_s=0.05) as rt:
                while not self.stop.is_set():
                    rt.infer(feeds)
        except BaseException as e:  # surfaced by the test
            self.error = e

    def __enter__(self) -> RobotService:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert self.error is None, self.error


@pytest.mark.serial  # asserts live p99 ratios
def test_probation_judges_against_previous_versions_live_p99_on_a_loaded_robot(
    tmp_path: Path, trust_material
) -> None:
    from agent.livestats import LiveStats

    with LiveStats(tmp_path / "data" / "run" / "live.sock") as live:
        device = Device(tmp_path, trust_material, live=live)
        device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
        with RobotService(device.data):
            deadline = time.monotonic() + 20
            while (w := live.snapshot("detector")) is None or w.count < 100:
                assert time.monotonic() < deadline, f"too few live samples of 1.0.0: {w}"
                time.sleep(0.05)
            e = device.deploy(
                build_bundle(
                    device.tmp,
                    device.tm.release,
                    version="1.1.0",
                    seed=2,  # same size, other weights: the same live latency
                    gate={"probation_s": 2, "max_regression_pct": 200},
                )
            )
    assert e.state is JobState.SUCCEEDED, e
    assert e.gate is not None and e.gate["probation_baseline"] == "live"
    assert e.gate["probation_baseline_count"] >= 50
    # Judged against the gate figure, the same live latency would have rolled back.
    assert e.gate["probation_baseline_p99_ms"] > 3 * e.gate["p99_ms"], e.gate
    probation = [x for x in device.events() if x.state is JobState.PROBATION][-1]
    assert probation.gate is not None and probation.gate["probation_baseline"] == "live"
    assert device.slot() == ("1.1.0", "1.0.0")


@pytest.mark.serial  # asserts live p99 ratios
def test_probation_without_previous_live_samples_judges_against_the_gate(
    tmp_path: Path, trust_material
) -> None:
    from agent.livestats import LiveStats

    with LiveStats(tmp_path / "data" / "run" / "live.sock") as live:
        device = Device(tmp_path, trust_material, live=live)
        device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
        # The service only starts serving once 1.1.0 is current: 1.0.0 has no live p99.
        with RobotService(device.data, start_on="1.1.0"):
            e = device.deploy(
                build_bundle(
                    device.tmp,
                    device.tm.release,
                    version="1.1.0",
                    seed=2,
                    gate={"probation_s": 10, "max_regression_pct": 200},
                )
            )
    assert (e.state, e.code) == (JobState.ROLLED_BACK, "probation_latency"), e
    assert e.gate is not None and e.gate["probation_baseline"] == "gate"
    assert e.gate["probation_baseline_p99_ms"] == e.gate["p99_ms"]
    assert e.gate["live_p99_ms"] > 3 * e.gate["p99_ms"], e.gate
    assert "gate p99" in (e.reason or "")
    assert device.slot() == ("1.0.0", None)


def test_rollback_rebuilds_an_unloadable_engine_from_the_held_bundle(device: Device) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.1.0", seed=2))
    engine = device.data / "models" / "detector" / "versions" / "1.0.0" / "engine"
    good = engine.read_bytes()
    engine.unlink()  # a new file, not the cache entry's inode: as after a bad copy
    engine.write_bytes(b"not an engine")
    device.worker.recover()  # an agent restart keeps the bundles held versions need
    cid = device.send("rollback", {"model": "detector", "to_version": "1.0.0"})
    e = device.run(cid)
    assert e.state is JobState.SUCCEEDED, e
    assert device.states(cid) == ["RECEIVED", "QUEUED", "BUILDING", "ACTIVATING", "SUCCEEDED"]
    assert device.slot() == ("1.0.0", "1.1.0")
    assert engine.read_bytes() == good  # rebuilt through the cache under the same key
    from agent.engines import load_engine

    load_engine(engine)  # and it passes its sidecar check


def test_rollback_whose_held_model_rotted_fails_and_current_stays(device: Device) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.1.0", seed=2))
    vdir = device.data / "models" / "detector" / "versions" / "1.0.0"
    (vdir / "engine").unlink()
    sha = (vdir / "bundle.sha256").read_text().strip()
    model = device.data / "bundles" / sha / "model.onnx"
    model.write_bytes(model.read_bytes()[:-8] + b"bitsrot!")
    e = device.run(device.send("rollback", {"model": "detector", "to_version": "1.0.0"}))
    assert (e.state, e.code) == (JobState.FAILED, "build_failed"), e
    assert "no longer matches" in (e.reason or "") and "1.1.0 stays active" in (e.reason or "")
    assert device.slot() == ("1.1.0", "1.0.0")


def test_rollback_whose_held_weight_file_rotted_fails_naming_it_and_current_stays(
    device: Device,
) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, external_weights=True))
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.1.0", seed=2))
    vdir = device.data / "models" / "detector" / "versions" / "1.0.0"
    (vdir / "engine").unlink()
    sha = (vdir / "bundle.sha256").read_text().strip()
    (weights,) = (device.data / "bundles" / sha).glob("weights-*.bin")
    weights.write_bytes(weights.read_bytes()[:-8] + b"bitsrot!")  # model.onnx untouched
    e = device.run(device.send("rollback", {"model": "detector", "to_version": "1.0.0"}))
    assert (e.state, e.code) == (JobState.FAILED, "build_failed"), e
    assert f"held weight file {weights.name} of " in (e.reason or ""), e
    assert "no longer matches the sha256 in its name" in (e.reason or "")
    assert "1.1.0 stays active" in (e.reason or "")
    assert device.slot() == ("1.1.0", "1.0.0")


def test_rollback_with_unloadable_engine_and_no_bundle_is_rejected(device: Device) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.1.0", seed=2))
    vdir = device.data / "models" / "detector" / "versions" / "1.0.0"
    (vdir / "engine").unlink()
    sha = (vdir / "bundle.sha256").read_text().strip()
    shutil.rmtree(device.data / "bundles" / sha)
    e = device.run(device.send("rollback", {"model": "detector", "to_version": "1.0.0"}))
    assert (e.state, e.code) == (JobState.REJECTED, "unknown_version")
    assert "bundle is no longer held" in (e.reason or "")
    assert device.slot() == ("1.1.0", "1.0.0")


def test_broker_redelivery_of_same_command_is_not_reported_as_replay(device: Device) -> None:
    cmd = make_command(DEV, "ping")
    env = sign_command(cmd, device.tm.operator)
    device.commands.process(env)
    device.commands.process(env, dup=True)  # MQTT DUP: our PUBACK was lost
    assert device.states(cmd.command_id) == ["RECEIVED", "SUCCEEDED"]
    device.commands.process(env)  # the same bytes again, not a retransmission: a replay
    assert device.events(cmd.command_id)[-1].code == "replay"


def test_model_that_cannot_be_built_fails_and_old_engine_stays(device: Device) -> None:
    device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    from protocol.bundle import make_manifest, write_bundle

    junk = device.tmp / "junk.onnx"
    junk.write_bytes(b"this is not an onnx model")
    golden = next(device.tmp.glob("src-detector-1.0.0-*/golden.npz"))
    files = {"model.onnx": junk, "golden.npz": golden}
    manifest = make_manifest(
        name="detector",
        version="1.1.0",
        files=files,
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": ["batch", 16]}],
    )
    bundle = write_bundle(device.tmp / "junk.jfb", manifest, files, [device.tm.release])
    e = device.deploy(bundle)
    assert (e.state, e.code) == (JobState.FAILED, "build_failed"), e
    assert "engine build" in (e.reason or "")
    assert device.slot() == ("1.0.0", None)
    assert device.worker.alive() is False  # in-process driver: no thread, nothing crashed


def test_target_mismatch_is_rejected_before_build(device: Device) -> None:
    bundle = build_bundle(
        device.tmp,
        device.tm.release,
        version="1.0.0",
        targets={"device_models": ["NVIDIA Jetson AGX Orin Developer Kit"]},
    )
    e = device.deploy(bundle)
    assert (e.state, e.code) == (JobState.REJECTED, "target_mismatch"), e
    assert device.slot() == (None, None)


def test_job_over_its_time_limit_ends_timed_out(tmp_path: Path, trust_material) -> None:
    device = Device(tmp_path, trust_material, extra={"limits": {"job_timeout_s": 0.01}})
    bundle = build_bundle(device.tmp, device.tm.release, version="1.0.0")
    cid = device.send("deploy", deploy_body(bundle))
    time.sleep(0.05)
    e = device.run(cid)
    assert (e.state, e.code) == (JobState.TIMED_OUT, "timed_out")
    assert device.slot() == (None, None)


def test_cancel_stops_a_running_download(tmp_path: Path, trust_material) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    device = Device(tmp_path, trust_material)
    bundle = build_bundle(device.tmp, device.tm.release, version="1.0.0")
    data = bundle.read_bytes()
    started = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            started.set()
            with contextlib.suppress(OSError):
                for i in range(0, len(data), 1024):  # ~1 KiB per 50 ms: minutes in all
                    self.wfile.write(data[i : i + 1024])
                    self.wfile.flush()
                    time.sleep(0.05)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/b.jfb"
        cid = device.send("deploy", deploy_body(bundle, url=url))
        runner = threading.Thread(target=device.run, args=(cid,))
        runner.start()
        assert started.wait(10)
        time.sleep(0.3)
        cancel = device.send("cancel", {"command_id": cid})
        runner.join(20)
        assert not runner.is_alive()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert device.events(cancel)[-1].state is JobState.SUCCEEDED
    e = device.events(cid)[-1]
    assert (e.state, e.code) == (JobState.CANCELED, "canceled")
    assert "DOWNLOADING" in device.states(cid)
    assert tmp_leftovers(device.data) == [] and device.slot() == (None, None)


def test_old_finished_jobs_are_pruned_but_ids_stay_seen(device: Device) -> None:
    ids = [device.send("ping") for _ in range(5)]
    future = time.time() + 31 * 86400
    assert device.store.prune_jobs(future, keep=2) == 3
    assert [device.store.job(c) is not None for c in ids] == [False] * 3 + [True] * 2
    assert all(device.store.seen(c) for c in ids)


def test_no_room_to_extract_fails_before_touching_anything(tmp_path: Path, trust_material) -> None:
    # A reserve larger than any disk: the check refuses before extraction starts.
    device = Device(tmp_path, trust_material, extra={"limits": {"min_free_disk_mb": 2**30}})
    e = device.deploy(build_bundle(device.tmp, device.tm.release, version="1.0.0"))
    assert (e.state, e.code) == (JobState.FAILED, "disk_full"), e
    assert "not enough disk" in (e.reason or "")
    assert tmp_leftovers(device.data) == [] and device.slot() == (None, None)
