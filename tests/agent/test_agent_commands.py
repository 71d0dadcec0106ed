"""Bad commands are each refused with their reason, and nothing kills the agent."""

from __future__ import annotations

import base64
import json
import os
import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from protocol.dsse import sign
from protocol.keys import SigningKey
from protocol.messages import COMMAND_PAYLOAD_TYPE
from protocol.topics import Topics
from protocol.trust import build_trust_root
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    Publisher,
    make_command,
    sign_command,
    write_agent_config,
)

DEV = "robot-7"


@pytest.fixture
def agent_env(tmp_path: Path, mosquitto, trust_material):
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        device_id=DEV,
        groups=["yard"],
        broker_url=mosquitto.url,
        data_dir=tmp_path / "data",
        trust_root=trust_material.write(tmp_path / "trust.json"),
    )
    with EventCollector(mosquitto.url, DEV) as events, Publisher(mosquitto.url) as pub:
        agent = AgentProcess(cfg).start()
        events.wait_online()
        try:
            yield agent, events, pub
        finally:
            agent.stop()


def _send(pub: Publisher, payload: bytes, topic: str | None = None) -> None:
    pub.publish(topic or Topics().device_cmd(DEV), payload)


def test_replayed_command_is_rejected_and_acted_on_once(agent_env, trust_material) -> None:
    _agent, events, pub = agent_env
    env = sign_command(make_command(DEV, "ping"), trust_material.operator)
    cid = json.loads(base64.b64decode(json.loads(env)["payload"]))["command_id"]
    _send(pub, env)
    events.wait_state(cid, "SUCCEEDED")
    _send(pub, env)
    rej = events.wait_state(cid, "REJECTED")
    assert rej.code == "replay" and "already received" in (rej.reason or "")
    assert [e.state.value for e in events.for_command(cid)].count("SUCCEEDED") == 1


def test_expired_command_is_rejected(agent_env, trust_material) -> None:
    _agent, events, pub = agent_env
    old = datetime.now(timezone.utc) - timedelta(hours=2)
    cmd = make_command(DEV, "ping", issued_at=old, ttl_s=60)
    _send(pub, sign_command(cmd, trust_material.operator))
    rej = events.wait_state(cmd.command_id, "REJECTED")
    assert rej.code == "command_expired" and "expired" in (rej.reason or "")


def test_command_signed_by_unknown_key_is_rejected(agent_env) -> None:
    _agent, events, pub = agent_env
    cmd = make_command(DEV, "ping")
    _send(pub, sign_command(cmd, SigningKey.generate()))
    rej = events.wait_state(cmd.command_id, "REJECTED")
    assert rej.code == "bad_signature"


def test_command_signed_by_release_key_is_rejected_as_wrong_role(agent_env, trust_material) -> None:
    _agent, events, pub = agent_env
    cmd = make_command(DEV, "ping")
    _send(pub, sign_command(cmd, trust_material.release))
    rej = events.wait_state(cmd.command_id, "REJECTED")
    assert rej.code == "wrong_role" and "operator" in (rej.reason or "")


def test_unsigned_command_is_rejected(agent_env) -> None:
    _agent, events, pub = agent_env
    cmd = make_command(DEV, "ping")
    env = sign(cmd.encode(), COMMAND_PAYLOAD_TYPE, [])
    _send(pub, env.encode())
    rej = events.wait_state(cmd.command_id, "REJECTED")
    assert rej.code == "unsigned"


def test_command_for_another_device_is_rejected(agent_env, trust_material) -> None:
    _agent, events, pub = agent_env
    cmd = make_command("robot-8", "ping")
    _send(pub, sign_command(cmd, trust_material.operator))  # delivered on our topic anyway
    rej = events.wait_state(cmd.command_id, "REJECTED")
    assert rej.code == "wrong_target" and "robot-8" in (rej.reason or "")
    grp = make_command("group:other", "ping")
    _send(pub, sign_command(grp, trust_material.operator), Topics().group_cmd("yard"))
    assert events.wait_state(grp.command_id, "REJECTED").code == "wrong_target"


def test_malformed_signed_command_is_rejected_with_its_id(agent_env, trust_material) -> None:
    _agent, events, pub = agent_env
    cid = str(uuid.uuid4())
    doc = {"schema": "jetfleet.command/v1", "command_id": cid, "kind": "self_destruct"}
    env = sign(json.dumps(doc).encode(), COMMAND_PAYLOAD_TYPE, [trust_material.operator])
    _send(pub, env.encode())
    rej = events.wait_state(cid, "REJECTED")
    assert rej.code == "malformed" and "self_destruct" in (rej.reason or "")


def test_group_command_is_accepted(agent_env, trust_material) -> None:
    _agent, events, pub = agent_env
    cmd = make_command("group:yard", "ping")
    _send(pub, sign_command(cmd, trust_material.operator), Topics().group_cmd("yard"))
    events.wait_state(cmd.command_id, "SUCCEEDED")


def _random_payload(rng: random.Random, operator: SigningKey) -> bytes:
    r = rng.random()
    if r < 0.5:
        return rng.randbytes(rng.randint(0, 300))
    if r < 0.7:
        return json.dumps({"payloadType": rng.choice(["x", COMMAND_PAYLOAD_TYPE]),
                           "payload": base64.b64encode(rng.randbytes(40)).decode(),
                           "signatures": [{"keyid": "a", "sig": "b"}]}).encode()  # fmt: skip
    if r < 0.85:
        return b"{" + rng.randbytes(rng.randint(0, 200))
    # Correctly signed but nonsensical documents: they reach the deepest checks.
    doc = {"schema": rng.choice(["jetfleet.command/v1", "jetfleet.command/v9", 3]),
           "command_id": rng.choice([str(uuid.uuid4()), "x", None]),
           "kind": rng.choice(["ping", "deploy", "cancel", 7]),
           "body": rng.choice([{}, {"url": 1}, [], None])}  # fmt: skip
    return sign(json.dumps(doc).encode(), COMMAND_PAYLOAD_TYPE, [operator]).encode()


@pytest.mark.slow
def test_ten_thousand_random_payloads_leave_agent_alive_with_flat_memory(
    agent_env, trust_material
) -> None:
    agent, events, pub = agent_env
    proc = psutil.Process(agent.pid)
    rng = random.Random(1234)
    topic = Topics().device_cmd(DEV)
    # Warm-up: let allocators and caches settle before the baseline.
    for _ in range(500):
        pub.client.publish(topic, _random_payload(rng, trust_material.operator), qos=1)
    probe = make_command(DEV, "ping")
    pub.publish(topic, sign_command(probe, trust_material.operator))
    events.wait_state(probe.command_id, "SUCCEEDED", timeout=120)
    before = proc.memory_info().rss
    for i in range(10_000):
        info = pub.client.publish(topic, _random_payload(rng, trust_material.operator), qos=1)
        if i % 500 == 0:
            info.wait_for_publish(timeout=30)
    probe = make_command(DEV, "ping")
    pub.publish(topic, sign_command(probe, trust_material.operator))
    events.wait_state(probe.command_id, "SUCCEEDED", timeout=180)
    after = proc.memory_info().rss
    assert agent.alive()
    # Generous: allocator noise, not growth per payload (10k payloads would be >> this).
    assert after - before < 8 * 2**20, (before, after)
    assert os.path.exists(agent.config)


def test_retained_status_reports_the_trust_root_version_and_follows_a_trust_update(
    agent_env, trust_material
) -> None:
    _agent, events, pub = agent_env
    assert events.wait_status(lambda s: s.online).trust_version == 1
    new_root = SigningKey.generate()
    env = build_trust_root(
        root=[new_root],
        release=[trust_material.release],
        operator=[trust_material.operator],
        version=2,
        sign_with=[trust_material.root, new_root],
    )
    cmd = make_command(DEV, "trust_update", {"trust_root": json.loads(env.encode())})
    _send(pub, sign_command(cmd, trust_material.operator))
    events.wait_state(cmd.command_id, "SUCCEEDED")
    status = events.wait_status(lambda s: s.online and s.trust_version == 2)
    assert status.device_id == DEV
