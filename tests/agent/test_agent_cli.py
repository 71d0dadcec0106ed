"""`jetfleet-agent` as a user runs it: exit codes 0/1/2/3 and what it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.agent.harness import REPO, build_bundle, write_agent_config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cfg(tmp_path: Path, trust_material) -> Path:
    return write_agent_config(
        tmp_path / "agent.toml",
        device_id="robot-2",
        broker_url="mqtt://127.0.0.1:1",
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )


def test_install_then_status_json_shows_active_version(tmp_path: Path, trust_material) -> None:
    cfg = _cfg(tmp_path, trust_material)
    bundle = build_bundle(tmp_path, trust_material.release, version="1.2.3")
    r = _cli("install", str(bundle), "--config", str(cfg), "--output", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "SUCCEEDED"
    s = _cli("status", "--config", str(cfg), "--output", "json")
    assert s.returncode == 0, s.stderr
    data = json.loads(s.stdout)
    assert data["models"]["detector"] == {"active": "1.2.3"}
    assert data["recent_jobs"][0]["state"] == "SUCCEEDED"
    # The install's events wait in the outbox for the next connection.
    assert data["pending_events"] >= 7
    human = _cli("status", "--config", str(cfg))
    assert "model detector: active 1.2.3, previous -" in human.stdout


def test_install_of_tampered_bundle_exits_3_and_installs_nothing(
    tmp_path: Path, trust_material
) -> None:
    cfg = _cfg(tmp_path, trust_material)
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    raw = bytearray(bundle.read_bytes())
    raw[700] ^= 1  # inside the signed manifest
    bundle.write_bytes(bytes(raw))
    r = _cli("install", str(bundle), "--config", str(cfg))
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.startswith("REJECTED")
    assert not (tmp_path / "data/models/detector").exists()


def test_run_with_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "robot-1"\n[broker]\nprotocol = "6"\n')
    r = _cli("run", "--config", str(cfg))
    assert r.returncode == 2
    assert "broker.protocol" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_run_with_untrusted_trust_root_exits_3(tmp_path: Path, trust_material) -> None:
    cfg = _cfg(tmp_path, trust_material)
    (tmp_path / "trust.json").write_text('{"payloadType": "x", "payload": "", "signatures": []}')
    r = _cli("run", "--config", str(cfg))
    assert r.returncode == 3 and "trust root" in r.stderr


def test_run_and_install_without_the_trust_root_file_name_the_key_and_exit_2(
    tmp_path: Path, trust_material
) -> None:
    cfg = _cfg(tmp_path, trust_material)
    (tmp_path / "trust.json").unlink()
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    for args in (("run",), ("install", str(bundle))):
        r = _cli(*args, "--config", str(cfg))
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Errno" not in lines[0]
        assert (
            f"config key trust_root: cannot read the trust root {tmp_path / 'trust.json'}"
            in (lines[0])
        )
        assert "jetfleet keys init" in lines[0]


def test_status_shows_the_trust_root_version_the_agent_holds(
    tmp_path: Path, trust_material
) -> None:
    cfg = _cfg(tmp_path, trust_material)
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    assert _cli("install", str(bundle), "--config", str(cfg)).returncode == 0
    s = _cli("status", "--config", str(cfg), "--output", "json")
    assert json.loads(s.stdout)["trust_version"] == 1
    assert "trust root version 1" in _cli("status", "--config", str(cfg)).stdout


def test_run_with_a_state_db_it_cannot_open_exits_1_naming_it(
    tmp_path: Path, trust_material
) -> None:
    cfg = _cfg(tmp_path, trust_material)
    (tmp_path / "data" / "state.db").mkdir(parents=True)  # not a file: SQLite cannot open it
    r = _cli("run", "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jetfleet-agent: state database {tmp_path / 'data' / 'state.db'}: ")
    assert "Traceback" not in r.stderr


def test_status_without_state_exits_1(tmp_path: Path, trust_material) -> None:
    r = _cli("status", "--config", str(_cfg(tmp_path, trust_material)))
    assert r.returncode == 1 and "has the agent run yet" in r.stderr
