"""Every id-like field of a command body is held to the manifest name's rule: a correctly
signed command naming a path is refused before anything touches the disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from protocol.dsse import sign
from protocol.errors import MessageError
from protocol.messages import COMMAND_PAYLOAD_TYPE
from protocol.topics import Topics
from protocol.trust import verify_command
from tests.agent.harness import (
    REPO,
    AgentProcess,
    EventCollector,
    Publisher,
    build_bundle,
    make_command,
    write_agent_config,
)

DEV = "robot-9"


def _signed_raw(trust_material, kind: str, body: dict[str, object]) -> tuple[str, bytes]:
    """An operator-signed command whose body is written as given, unvalidated: what a
    compromised or buggy controller could send."""
    doc = make_command(DEV, "ping").to_dict()
    doc.update(kind=kind, body=body)
    env = sign(json.dumps(doc).encode(), COMMAND_PAYLOAD_TYPE, [trust_material.operator])
    return str(doc["command_id"]), env.encode()


def _tree(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


@pytest.mark.slow
def test_signed_rollback_naming_a_path_is_refused_and_creates_nothing_outside(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    data = tmp_path / "data"
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=data,
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    installed = subprocess.run(
        [sys.executable, "-m", "agent.cli", "install", str(bundle), "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr
    # A look-alike model tree outside data_dir: what "../../outside" resolves to from
    # data_dir/models. Before the fix the agent switched its links and ran the hook.
    outside = tmp_path / "outside"
    shutil.copytree(data / "models/detector/versions", outside / "versions", symlinks=True)
    with (
        EventCollector(mosquitto.url, DEV) as events,
        Publisher(mosquitto.url) as pub,
        AgentProcess(cfg) as agent,
    ):
        events.wait_online()
        before = _tree(tmp_path, data)
        cid, env = _signed_raw(
            trust_material, "rollback", {"model": "../../outside", "to_version": "1.0.0"}
        )
        pub.publish(Topics().device_cmd(DEV), env)
        rej = events.wait_terminal(cid)
        assert rej.state.value == "REJECTED"
        assert rej.code == "malformed"
        assert rej.reason is not None and "\n" not in rej.reason
        assert "invalid model name '../../outside'" in rej.reason
        # The agent is still answering.
        ping = make_command(DEV, "ping")
        pub.publish(
            Topics().device_cmd(DEV),
            sign(ping.encode(), COMMAND_PAYLOAD_TYPE, [trust_material.operator]).encode(),
        )
        events.wait_state(ping.command_id, "SUCCEEDED")
        assert agent.alive()
        assert _tree(tmp_path, data) - before == set()

    assert not (outside / "current").exists() and not (outside / "current").is_symlink()


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        ("deploy", {"name": "../x"}, "invalid model name '../x'"),
        ("deploy", {"name": "det", "rollout_id": "../r"}, "invalid rollout id '../r'"),
        ("deploy", {"name": "det", "version": "1.0/../../x"}, "invalid version '1.0/../../x'"),
        ("rollback", {"model": "det", "to_version": "1.0.0", "rollout_id": "A B"}, "rollout id"),
        ("cancel", {"command_id": "../../etc"}, "command_id '../../etc' is not a UUID"),
    ],
)
def test_every_id_like_body_field_is_refused_by_command_verification(
    trust_material, kind: str, body: dict[str, object], expected: str
) -> None:
    if kind == "deploy":
        body = {"url": "file:///b.jfb", "sha256": "0" * 64, "size": 1, **body}
    _cid, env = _signed_raw(trust_material, kind, body)
    with pytest.raises(MessageError) as err:
        verify_command(
            env, trust_material.trust, device_id=DEV, groups=[], now=datetime.now(timezone.utc)
        )
    assert expected in err.value.reason
