"""`jetfleet keys push`: a rotated trust root reaches real agents.

The agents are real `python -m agent.cli run` subprocesses on a real Mosquitto; the
operator runs `jetfleet` as a subprocess. After `keys rotate` replaced the operator and
release keys, the push itself can only be checked by a device against the trust root it
still holds, so it must carry a signature by the retired operator key.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fleet import cli_env, run_cli, wait_until

from controller.rollouts.commands import CommandSigner
from controller.sandbox.localbroker import LocalMosquitto
from controller.security import keystore
from controller.security.keystore import init_keys, rotate_keys, trust_update_signers
from protocol.errors import VerificationError
from protocol.messages import CommandKind
from protocol.topics import Topics
from protocol.trust import load_trust_root, verify_command
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    Publisher,
    build_bundle,
    deploy_body,
    make_command,
    sign_command,
    write_agent_config,
)

T = Topics()


def test_push_signature_is_accepted_under_every_earlier_trust_root_and_by_no_other_key(
    tmp_path: Path,
) -> None:
    d = tmp_path / "keys"
    v1 = init_keys(d)
    rotate_keys(d)  # v2: new release + operator
    v3 = rotate_keys(d, roles=["operator"])
    retired = [v for v, _ in keystore.retired_keys(d, "operator")]
    assert retired == [2, 1]
    signers = trust_update_signers(d, v3)
    assert len({k.keyid for k in signers}) == 3 and signers[0].keyid == v3.operator.keyid

    pushed = CommandSigner(signers).trust_update(
        "robot-1", trust_root=json.loads(v3.trust_envelope)
    )
    now = datetime.now(timezone.utc)  # the push was signed just now, not at collection
    roots = [
        load_trust_root((d / "retired/v1/trust.json").read_bytes(), now),
        load_trust_root((d / "retired/v2/trust.json").read_bytes(), now),
        v3.trust,
    ]
    for trust in roots:  # a device on any earlier version accepts the command
        cmd = verify_command(pushed.envelope, trust, device_id="robot-1", groups=[], now=now)
        assert cmd.kind is CommandKind.TRUST_UPDATE
    # Signed with the current operator key alone, a v1 device would refuse it.
    alone = CommandSigner([v3.operator]).trust_update("robot-1", trust_root={})
    with pytest.raises(VerificationError):
        verify_command(alone.envelope, v1.trust, device_id="robot-1", groups=[], now=now)


def test_a_database_from_before_trust_pushes_opens_and_keeps_its_rollouts(tmp_path: Path) -> None:
    from controller.fleet.registry import open_db
    from controller.rollouts.store import _SCHEMA, RolloutStore

    conn = open_db(tmp_path / "old.db")
    conn.executescript(re.sub(r",\s*payload TEXT[^\n]*", "", _SCHEMA))  # the first release's
    assert "payload" not in {r[1] for r in conn.execute("PRAGMA table_info(rollouts)")}
    conn.execute(
        "INSERT INTO rollouts (id, kind, state, created_at, updated_at, model, version, target, "
        "waves_spec, max_failure_rate, wave_timeout, auto_rollback) "
        "VALUES ('r-old', 'deploy', 'succeeded', 1, 1, 'detector', '1.0.0', 'all', '100%', "
        "0.05, 900, 1)"
    )
    store = RolloutStore(conn)
    old = store.get("r-old")
    assert old is not None and old.payload is None and old.model == "detector"
    RolloutStore(conn)  # a second process opening it finds the column there


def test_retired_key_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    init_keys(d)
    keys = rotate_keys(d)
    (d / "retired/v1/operator.key").chmod(0o644)
    with pytest.raises(keystore.KeystoreError, match="chmod 600"):
        trust_update_signers(d, keys)


def test_rotated_trust_root_pushed_to_a_real_agent_then_new_keys_deploy_and_the_retired_operator_key_is_refused(  # noqa: E501
    tmp_path: Path, mosquitto: LocalMosquitto
) -> None:
    keys_dir = tmp_path / "keys"
    init_keys(keys_dir)
    provisioned = tmp_path / "provisioned-trust.json"  # what the robot was installed with
    shutil.copy(keys_dir / "trust.json", provisioned)
    # robot-b was provisioned from another operator's key set: it trusts none of ours.
    init_keys(tmp_path / "foreign-keys")
    env = cli_env(tmp_path, mosquitto.url, keys_dir)
    agents = []
    for device, trust in (
        ("robot-a", provisioned),
        ("robot-b", tmp_path / "foreign-keys/trust.json"),
    ):
        cfg = write_agent_config(
            tmp_path / device / "agent.toml",
            device_id=device,
            broker_url=mosquitto.url,
            data_dir=tmp_path / device / "data",
            trust_root=trust,
            telemetry_interval_s=60,
        )
        agents.append(AgentProcess(cfg, env={"OMP_NUM_THREADS": "1"}).start())
    try:

        def online() -> int:
            out = run_cli(env, "devices", "--output", "json")
            return sum(d["online"] for d in json.loads(out.stdout)) if out.returncode == 0 else 0

        wait_until(lambda: online() == 2, timeout=60, what="two agents online")

        def trust_versions() -> dict[str, int | None]:
            out = run_cli(env, "devices", "--output", "json")
            return {d["id"]: d["trust_version"] for d in json.loads(out.stdout)}

        assert trust_versions() == {"robot-a": 1, "robot-b": 1}  # from their retained status

        rot = run_cli(env, "keys", "rotate", "--output", "json")
        assert rot.returncode == 0, rot.stderr
        new = keystore.load_keys(keys_dir)
        assert json.loads(rot.stdout)["version"] == 2

        out = run_cli(env, "keys", "push", "--target", "robot-a,robot-b", "--wait",
                      "--output", "json", timeout=120)  # fmt: skip
        assert out.returncode == 1, out.stdout + out.stderr  # robot-b refused it
        result = json.loads(out.stdout)
        assert result["rollout"]["kind"] == "trust_update"
        assert result["rollout"]["version"] == "2"
        by_device = {d["device_id"]: d for d in result["devices"]}
        assert by_device["robot-a"]["state"] == "SUCCEEDED", agents[0].log()[-3000:]
        assert "trust root version 2" in by_device["robot-a"]["reason"]
        assert by_device["robot-b"]["state"] == "REJECTED"
        assert "operator" in by_device["robot-b"]["reason"]  # names what it could not verify
        # The agent persisted the new root before acknowledging it.
        assert (tmp_path / "robot-a/data/trust/2.json").read_bytes() == new.trust_envelope

        listed = run_cli(env, "rollout", "list", "--output", "json")
        assert [(r["kind"], r["model"], r["state"]) for r in json.loads(listed.stdout)] == [
            ("trust_update", "trust-root", "aborted")
        ]

        # A bundle signed by the NEW release key, deployed with commands signed by the
        # NEW operator key (what `rollout start` uses), is taken.
        bundle = build_bundle(tmp_path / "build", new.release, version="2.0.0")
        dep = run_cli(env, "rollout", "start", str(bundle), "--target", "robot-a",
                      "--waves", "100%", "--wait", "--output", "json", timeout=180)  # fmt: skip
        assert dep.returncode == 0, dep.stdout + dep.stderr + agents[0].log()[-3000:]
        assert json.loads(dep.stdout)["rollout"]["state"] == "succeeded"

        # A deploy signed by the retired operator key is refused: robot-a forgot it.
        retired = dict(keystore.retired_keys(keys_dir, "operator"))[1]
        assert retired.keyid != new.operator.keyid
        old_bundle = build_bundle(tmp_path / "build-old", new.release, version="3.0.0")
        cmd = make_command("robot-a", "deploy", deploy_body(old_bundle))
        with EventCollector(mosquitto.url, "robot-a") as events, Publisher(mosquitto.url) as p:
            p.publish(T.device_cmd("robot-a"), sign_command(cmd, retired))
            final = events.wait_terminal(cmd.command_id, timeout=30)
        assert final.state.value == "REJECTED"
        assert final.code == "bad_signature", final
        assert "operator" in (final.reason or "")

        # Rotated once more and pushed without --wait: the background driver (`rollout
        # resume` in its own process) signs with the keys robot-a now trusts (v2's, retired).
        assert run_cli(env, "keys", "rotate", "--role", "operator").returncode == 0
        bg = run_cli(env, "keys", "push", "--target", "robot-a", "--output", "json")
        assert bg.returncode == 0, bg.stderr
        rid = json.loads(bg.stdout)["rollout"]["id"]

        def pushed() -> bool:
            st = run_cli(env, "rollout", "status", rid, "--output", "json")
            return json.loads(st.stdout)["rollout"]["state"] == "succeeded"

        wait_until(pushed, timeout=60, what="the background push")
        assert (tmp_path / "robot-a/data/trust/3.json").is_file()

        # Its status now reports version 3: pushing it again sends robot-a nothing.
        wait_until(lambda: trust_versions()["robot-a"] == 3, timeout=30, what="status v3")
        with EventCollector(mosquitto.url, "robot-a") as events:
            again = run_cli(env, "keys", "push", "--target", "robot-a", "--wait")
            assert again.returncode == 0, again.stdout + again.stderr
            assert "1 device(s) already up to date" in again.stderr
            rid = run_cli(env, "rollout", "list", "--output", "json")
            latest = json.loads(rid.stdout)[0]
            st = json.loads(run_cli(env, "rollout", "status", latest["id"], "--output",
                                    "json").stdout)  # fmt: skip
            assert (latest["kind"], latest["state"]) == ("trust_update", "succeeded")
            (a,) = st["devices"]
            assert a["state"] == "SUCCEEDED" and a["command_id"] is None
            assert a["reason"].startswith("already up to date")
            assert events.events == []  # the agent was not asked anything
    finally:
        for a in agents:
            a.stop()


@pytest.mark.slow
def test_an_agent_two_root_rotations_behind_walks_the_pushed_chain_one_version_at_a_time(
    tmp_path: Path, mosquitto: LocalMosquitto
) -> None:
    keys_dir = tmp_path / "keys"
    init_keys(keys_dir)
    provisioned = tmp_path / "provisioned-trust.json"
    shutil.copy(keys_dir / "trust.json", provisioned)
    env = cli_env(tmp_path, mosquitto.url, keys_dir)
    for _ in range(2):  # v2 and v3, each with a new root key: v3 is not signed by v1's
        rot = run_cli(env, "keys", "rotate", "--role", "root")
        assert rot.returncode == 0, rot.stderr
    cfg = write_agent_config(
        tmp_path / "robot-a" / "agent.toml",
        device_id="robot-a",
        broker_url=mosquitto.url,
        data_dir=tmp_path / "robot-a" / "data",
        trust_root=provisioned,
        telemetry_interval_s=60,
    )
    with EventCollector(mosquitto.url, "robot-a") as events, AgentProcess(cfg) as agent:
        events.wait_online()
        out = run_cli(env, "keys", "push", "--target", "robot-a", "--wait", "--output", "json",
                      timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr + agent.log()[-3000:]
        (device,) = json.loads(out.stdout)["devices"]
        assert device["state"] == "SUCCEEDED" and "trust root version 3" in device["reason"]
        status = events.wait_status(lambda s: s.trust_version == 3, timeout=30)
        assert status.trust_version == 3
    trust = tmp_path / "robot-a/data/trust"
    assert sorted(p.name for p in trust.glob("*.json")) == ["2.json", "3.json"]
    assert (trust / "3.json").read_bytes() == (keys_dir / "trust.json").read_bytes()
    # A restart replays that chain and lands on version 3 again.
    with EventCollector(mosquitto.url, "robot-a") as events, AgentProcess(cfg):
        assert events.wait_status(lambda s: s.online and s.trust_version == 3, timeout=30)
