"""`jetfleet-agent doctor` against recorded Jetson files, real trust roots and a real Mosquitto."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import doctor
from agent.doctor import FAIL, PASS, WARN, CheckResult, run_checks
from controller.sandbox.localbroker import LocalMosquitto, free_port
from protocol.keys import SigningKey
from protocol.trust import build_trust_root

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "jetson"
NOW = datetime.now(timezone.utc)

# /proc/meminfo of an Orin Nano 8 GB at idle (JetPack 6.2), first lines as the kernel writes them.
MEMINFO_IDLE = """MemTotal:        7802868 kB
MemFree:         4408132 kB
MemAvailable:    5922024 kB
Buffers:           31776 kB
Cached:          1601624 kB
SwapCached:            0 kB
"""
# The same board with a detector and a SLAM stack running: 180 MB left.
MEMINFO_BUSY = MEMINFO_IDLE.replace("5922024", "184320").replace("4408132", "60112")


def jetson_root(tmp_path: Path, fixture: str, meminfo: str = MEMINFO_IDLE) -> Path:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / fixture, root)
    (root / "proc" / "meminfo").write_text(meminfo)
    gpu = root / "dev" / "nvgpu" / "igpu0"
    gpu.mkdir(parents=True)
    (gpu / "ctrl").touch()
    (root / "dev" / "nvhost-ctrl-gpu").touch()
    (root / "run" / "systemd" / "timesync").mkdir(parents=True)
    (root / "run" / "systemd" / "timesync" / "synchronized").touch()
    return root


def write_config(tmp_path: Path, trust: Path, broker: str, **extra: str) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    lines = [
        'device_id = "robot-0042"',
        'groups = ["warehouse-a"]',
        f'data_dir = "{data_dir}"',
        f'trust_root = "{trust}"',
        f'backend = "{extra.pop("backend", "tensorrt")}"',
        *extra.pop("top", "").splitlines(),
        "[broker]",
        f'url = "{broker}"',
        f"protocol = {extra.pop('protocol', '5')}",
        *[f'{k} = "{v}"' for k, v in extra.items()],
    ]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fake_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """JetPack's tensorrt module is not on this machine: a module with its version attribute."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tensorrt.py").write_text('__version__ = "10.3.0"\n')
    (site / "pycuda").mkdir()
    (site / "pycuda" / "__init__.py").write_text("")
    (site / "pycuda" / "driver.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    for name in ("tensorrt", "pycuda", "pycuda.driver"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return site


@pytest.fixture
def trust_file(tmp_path: Path, trust_material: Any) -> Path:
    return trust_material.write(tmp_path / "trust.json")


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_a_healthy_orin_with_a_reachable_broker_passes_every_check(
    tmp_path: Path, mosquitto: LocalMosquitto, trust_file: Path, fake_tensorrt: Path
) -> None:
    root = jetson_root(tmp_path, "orin-nano-super-r36.4.7")
    results = run_checks(write_config(tmp_path, trust_file, mosquitto.url), root=root)
    checks = by_name(results)
    assert [r.name for r in results] == [
        "config",
        "jetpack",
        "tensorrt",
        "pycuda",
        "gpu",
        "disk",
        "state",
        "memory",
        "clock",
        "trust",
        "broker",
    ]
    assert {r.status for r in results} == {PASS}, doctor.render_human(results)
    assert "R36.4.7 (JetPack 6.2.1)" in checks["jetpack"].detail
    assert "Orin Nano Engineering Reference Developer Kit Super" in checks["jetpack"].detail
    assert "TensorRT 10.3.0" in checks["tensorrt"].detail
    assert "/dev/nvgpu/igpu0/ctrl" in checks["gpu"].detail
    assert "5783 MB available" in checks["memory"].detail
    assert "NTP synchronized" in checks["clock"].detail
    assert "version 1" in checks["trust"].detail
    assert f"connected to 127.0.0.1:{mosquitto.port} (MQTT 5)" in checks["broker"].detail
    assert doctor.exit_code(results) == 0


def test_the_cli_prints_json_and_exits_1_when_the_broker_is_down(
    tmp_path: Path, mosquitto: LocalMosquitto, trust_file: Path, fake_tensorrt: Path
) -> None:
    root = jetson_root(tmp_path, "agx-orin-r36.4.0")
    config = write_config(tmp_path, trust_file, mosquitto.url)
    mosquitto.stop()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_tensorrt), *sys.path])}
    cmd = [sys.executable, "-m", "agent.doctor", "--config", str(config), "--root", str(root)]
    done = subprocess.run(
        [*cmd, "--output", "json", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["broker"] == FAIL and statuses["jetpack"] == PASS
    broker = next(c for c in report["checks"] if c["name"] == "broker")
    assert f"cannot reach 127.0.0.1:{mosquitto.port}" in broker["detail"]
    assert "nc -vz" in broker["fix"]
    human = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert human.returncode == 1
    assert "FAIL  broker" in human.stdout and "-> check the URL" in human.stdout
    assert human.stdout.rstrip().endswith("1 failed, 0 warning(s)")


def test_jetpack_4_is_refused_as_too_old(tmp_path: Path, trust_file: Path) -> None:
    result = doctor.check_jetpack(
        jetson_root(tmp_path, "nano-r32.7.1"),
        doctor.load_config(write_config(tmp_path, trust_file, "mqtt://x")),
    )
    assert result.status == FAIL
    assert "R32.7.1 (JetPack 4.6.1), NVIDIA Jetson Nano Developer Kit: too old" in result.detail
    assert "JetPack 6" in result.fix


def test_jetpack_5_on_xavier_passes(tmp_path: Path, trust_file: Path) -> None:
    result = doctor.check_jetpack(
        jetson_root(tmp_path, "xavier-nx-r35.4.1"),
        doctor.load_config(write_config(tmp_path, trust_file, "mqtt://x")),
    )
    assert (result.status, result.detail) == (
        PASS,
        "Jetson Linux R35.4.1 (JetPack 5.1.2), NVIDIA Jetson Xavier NX Developer Kit",
    )


def test_a_pc_running_onnxruntime_only_warns_about_jetpack_tensorrt_and_gpu(
    tmp_path: Path, mosquitto: LocalMosquitto, trust_file: Path
) -> None:
    root = tmp_path / "pc"
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text(MEMINFO_IDLE)

    def no_tensorrt(name: str) -> Any:
        raise ModuleNotFoundError(f"No module named {name!r}")

    config = write_config(tmp_path, trust_file, mosquitto.url, backend="onnxruntime")
    checks = by_name(run_checks(config, root=root, import_module=no_tensorrt))
    assert checks["jetpack"].status == WARN and "not a Jetson" in checks["jetpack"].detail
    assert checks["tensorrt"].status == WARN
    assert "engines will use onnxruntime" in checks["tensorrt"].detail
    assert checks["gpu"].status == WARN
    assert doctor.exit_code(list(checks.values())) == 0


def test_backend_tensorrt_without_the_module_fails_and_says_how_to_install_it(
    tmp_path: Path, trust_file: Path
) -> None:
    def no_tensorrt(name: str) -> Any:
        raise ModuleNotFoundError(f"No module named {name!r}")

    config = doctor.load_config(write_config(tmp_path, trust_file, "mqtt://x"))
    result = doctor.check_tensorrt(config, no_tensorrt, FIXTURES / "agx-orin-r36.4.0")
    assert result.status == FAIL
    assert "libnvinfer 10.3.0 is installed" in result.detail
    assert "apt-get install python3-libnvinfer" in result.fix
    assert "--system-site-packages" in result.fix


def test_gpu_nodes_the_user_cannot_open_fail_with_the_group_fix(
    tmp_path: Path, trust_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = jetson_root(tmp_path, "agx-orin-r36.3.0")
    # As root every node is accessible; the check runs as the jetfleet user on a robot.
    monkeypatch.setattr(doctor.os, "access", lambda path, mode: False)
    config = doctor.load_config(write_config(tmp_path, trust_file, "mqtt://x"))
    result = doctor.check_gpu(root, config)
    assert result.status == FAIL
    assert "/dev/nvhost-ctrl-gpu, /dev/nvgpu/igpu0/ctrl exist but user" in result.detail
    assert "usermod -aG video,render" in result.fix


def test_too_little_disk_or_memory_fails_against_the_minimums(
    tmp_path: Path, trust_file: Path
) -> None:
    config = doctor.load_config(
        write_config(
            tmp_path, trust_file, "mqtt://x", top="[limits]\nmin_free_disk_mb = 1000000000"
        )
    )
    disk = doctor.check_disk(config)
    assert disk.status == FAIL and "minimum 1000000000 MB" in disk.detail
    root = jetson_root(tmp_path, "orin-nano-super-r36.4.7", meminfo=MEMINFO_BUSY)
    memory = doctor.check_memory(root, 512)
    assert (memory.status, memory.detail) == (FAIL, "180 MB available, minimum 512 MB")
    assert "zram" in memory.fix


def test_an_unset_clock_fails_before_any_signature_check_is_believed(
    tmp_path: Path, trust_file: Path
) -> None:
    config = doctor.load_config(write_config(tmp_path, trust_file, "mqtt://x"))
    boot_1970 = datetime(1970, 1, 1, 0, 1, tzinfo=timezone.utc)
    result = doctor.check_clock(config, boot_1970, tmp_path)
    assert result.status == FAIL
    assert "1970-01-01 00:01:00Z, before 2025-01-01: it was never set" in result.detail
    assert "timedatectl set-ntp true" in result.fix


def test_a_trust_root_past_its_expiry_fails_both_the_clock_and_the_trust_check(
    tmp_path: Path, mosquitto: LocalMosquitto
) -> None:
    root_key = SigningKey.generate()
    env = build_trust_root(
        root=[root_key],
        release=[SigningKey.generate()],
        operator=[SigningKey.generate()],
        expires=NOW + timedelta(days=10),
    )
    trust = tmp_path / "trust.json"
    trust.write_bytes(env.encode())
    config = write_config(tmp_path, trust, mosquitto.url, backend="onnxruntime")
    soon = by_name(run_checks(config, root=tmp_path, now=NOW))
    assert soon["clock"].status == WARN and "expires in 10 day(s)" in soon["clock"].detail
    assert soon["trust"].status == PASS
    later = by_name(run_checks(config, root=tmp_path, now=NOW + timedelta(days=11)))
    assert later["clock"].status == FAIL and "after the trust root expiry" in later["clock"].detail
    assert later["trust"].status == FAIL
    assert "trust root version 1 expired at" in later["trust"].detail
    assert "jetfleet keys rotate" in later["trust"].fix


def test_a_tampered_or_missing_trust_root_fails_with_the_reason(
    tmp_path: Path, trust_material: Any
) -> None:
    envelope = json.loads(trust_material.envelope_bytes)
    envelope["signatures"][0]["sig"] = envelope["signatures"][0]["sig"][::-1]
    tampered = tmp_path / "trust.json"
    tampered.write_text(json.dumps(envelope))
    config = doctor.load_config(write_config(tmp_path, tampered, "mqtt://x"))
    result = doctor._load_trust(config, NOW)[1]  # noqa: SLF001 - the check alone
    assert result.status == FAIL
    assert f"trust root {tampered} is not valid" in result.detail
    tampered.unlink()
    missing = doctor._load_trust(config, NOW)[1]  # noqa: SLF001
    assert missing.status == FAIL
    assert "(config key trust_root) cannot be read: No such file or directory" in missing.detail


def test_a_bad_config_is_the_only_line_and_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "robot-1"\n[broker]\nprotocol = 4.5\n')
    results = run_checks(path)
    assert [(r.name, r.status) for r in results] == [("config", FAIL)]
    assert "broker.protocol" in results[0].detail


def test_a_broker_that_refuses_anonymous_clients_fails_with_the_connack_reason(
    tmp_path: Path, trust_file: Path
) -> None:
    with LocalMosquitto(tmp_path / "strict", extra_config="allow_anonymous false") as broker:
        config = doctor.load_config(write_config(tmp_path, trust_file, broker.url))
        result = doctor.check_broker(config, timeout=5)
    assert result.status == FAIL
    assert "refused the connection: Not authorized" in result.detail
    assert "username/password" in result.fix


def test_mqtts_against_a_plain_listener_fails_as_a_tls_problem(
    tmp_path: Path, mosquitto: LocalMosquitto, trust_file: Path
) -> None:
    url = f"mqtts://127.0.0.1:{mosquitto.port}"
    config = doctor.load_config(write_config(tmp_path, trust_file, url))
    result = doctor.check_broker(config, timeout=3)
    assert result.status == FAIL
    assert f"TLS handshake with 127.0.0.1:{mosquitto.port} failed" in result.detail
    assert "8883" in result.fix


def test_a_missing_ca_file_is_named(tmp_path: Path, trust_file: Path) -> None:
    config = doctor.load_config(
        write_config(tmp_path, trust_file, "mqtts://127.0.0.1:1", ca=str(tmp_path / "ca.pem"))
    )
    result = doctor.check_broker(config, timeout=1)
    assert result.status == FAIL
    assert result.detail == f"CA certificate file {tmp_path / 'ca.pem'} does not exist"


def test_each_node_of_a_cluster_is_checked_and_a_dead_one_is_a_warning(
    tmp_path: Path, trust_file: Path
) -> None:
    dead = free_port()
    with LocalMosquitto(tmp_path / "a") as a, LocalMosquitto(tmp_path / "b") as b:
        both = doctor.load_config(write_config(tmp_path, trust_file, f"{a.url},{b.url}"))
        result = doctor.check_broker(both, timeout=5)
        assert result.status == PASS
        assert result.detail.startswith("all 2 nodes: connected to 127.0.0.1:")
        assert f":{b.port} (MQTT" in result.detail
        one = doctor.load_config(
            write_config(tmp_path, trust_file, f"{a.url},mqtt://127.0.0.1:{dead}")
        )
        result = doctor.check_broker(one, timeout=5)
    assert result.status == WARN
    assert result.detail.startswith(f"1 of 2 nodes failed: cannot reach 127.0.0.1:{dead}")
    assert f"nc -vz 127.0.0.1 {dead}" in result.fix
    none = doctor.load_config(
        write_config(tmp_path, trust_file, f"mqtt://127.0.0.1:{dead},mqtt://127.0.0.1:{dead}")
    )
    assert doctor.check_broker(none, timeout=2).status == FAIL


def test_the_broker_check_does_not_take_over_the_running_agents_session(
    tmp_path: Path, mosquitto: LocalMosquitto, trust_file: Path
) -> None:
    disconnected = threading.Event()
    agent = paho.Client(CallbackAPIVersion.VERSION2, client_id="robot-0042")
    agent.on_disconnect = lambda *args: disconnected.set()
    connected = threading.Event()
    agent.on_connect = lambda *args: connected.set()
    agent.connect("127.0.0.1", mosquitto.port)
    agent.loop_start()
    try:
        assert connected.wait(5)
        config = doctor.load_config(write_config(tmp_path, trust_file, mosquitto.url))
        assert doctor.check_broker(config, timeout=5).status == PASS
        assert not disconnected.wait(1.0)
    finally:
        agent.disconnect()
        agent.loop_stop()


def test_the_trust_check_follows_rotations_the_agent_accepted(
    tmp_path: Path, trust_material: Any
) -> None:
    from agent.truststore import TrustStore

    trust = trust_material.write(tmp_path / "trust.json")
    config = doctor.load_config(write_config(tmp_path, trust, "mqtt://x"))
    v2 = build_trust_root(
        root=[trust_material.root],
        release=[trust_material.release],
        operator=[trust_material.operator],
        version=2,
        expires=NOW + timedelta(days=20),
    )
    TrustStore(trust, config.data_dir, NOW).update(v2, NOW)
    loaded = doctor._load_trust(config, NOW)[1]  # noqa: SLF001 - the check alone
    assert loaded.detail.startswith(f"{trust}: version 2")
    clock = doctor.check_clock(config, NOW, tmp_path)
    assert clock.status == WARN and "expires in 20 day(s)" in clock.detail


def _without_pycuda(name: str) -> Any:
    if name.startswith("pycuda"):
        raise ModuleNotFoundError("No module named 'pycuda'")
    return importlib.import_module(name)


@pytest.mark.parametrize(
    ("backend", "top", "status"),
    [("auto", "", WARN), ("auto", "allow_cpu_fallback = false", FAIL), ("tensorrt", "", FAIL)],
)
def test_tensorrt_without_pycuda_is_reported_with_the_nvcc_fix(
    tmp_path: Path, trust_file: Path, fake_tensorrt: Path, backend: str, top: str, status: str
) -> None:
    path = write_config(tmp_path, trust_file, "mqtt://x", backend=backend, top=top)
    result = doctor.check_pycuda(doctor.load_config(path), _without_pycuda)
    assert result.status == status
    assert "TensorRT engines cannot run" in result.detail
    assert ("10-50x slower" in result.detail) == (backend == "auto")
    assert "nvcc" in result.fix and "pip install pycuda" in result.fix
