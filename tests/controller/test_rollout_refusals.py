"""A device's refusals of repeated or unverifiable messages never settle the job that is
really running: a REAL agent, a real Mosquitto and the real `jetfleet rollout start`.

A hostile broker (or the controller's own re-publish of a command whose PUBACK it did not
record) sends a running deploy's exact bytes again, and unsigned junk carrying the same
command id. The agent refuses both, and says so, as refusals (REJECTED with the refused
bytes' digest); the rollout still finishes SUCCEEDED, with no abort.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fleet import build_bundle, cli_env, jetfleet_cmd, run_cli
from paho.mqtt.enums import CallbackAPIVersion

from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import KeySet, init_keys
from protocol.dsse import sign
from protocol.messages import COMMAND_PAYLOAD_TYPE, JobState
from protocol.topics import Topics
from protocol.transport import parse_broker_url
from tests.agent.harness import AgentProcess, EventCollector, publish, write_agent_config

pytestmark = pytest.mark.slow

DEV = "robot-r"


class CommandTap:
    """Keeps the exact bytes of every command published to the device (what a broker
    sees, and could send again)."""

    def __init__(self, broker_url: str) -> None:
        addr = parse_broker_url(broker_url)
        self.payloads: list[bytes] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(Topics().device_cmd(DEV), 1)
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port)
        self.client.loop_start()
        assert ready.wait(10), "command tap could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.payloads.append(bytes(msg.payload))
            self._cond.notify_all()

    def first(self, timeout: float = 60) -> bytes:
        with self._cond:
            assert self._cond.wait_for(lambda: self.payloads, timeout), "no command seen"
            return self.payloads[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Rig:
    root: Path
    keys: KeySet
    broker: LocalMosquitto
    env: dict[str, str]
    agent: AgentProcess


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    keys = init_keys(tmp_path / "keys")
    broker = LocalMosquitto(tmp_path / "broker")
    broker.start()
    cfg = write_agent_config(
        tmp_path / DEV / "agent.toml",
        device_id=DEV,
        broker_url=broker.url,
        data_dir=tmp_path / DEV / "data",
        trust_root=tmp_path / "keys" / "trust.json",
        telemetry_interval_s=60,
    )
    agent = AgentProcess(cfg, env={"OMP_NUM_THREADS": "1"}).start()
    try:
        yield Rig(tmp_path, keys, broker, cli_env(tmp_path, broker.url, tmp_path / "keys"), agent)
    finally:
        agent.stop()
        broker.stop()


def _command_id(envelope: bytes) -> str:
    return str(json.loads(base64.b64decode(json.loads(envelope)["payload"]))["command_id"])


def test_a_resent_running_deploy_and_junk_with_its_id_are_reported_as_refusals_and_the_rollout_still_succeeds(  # noqa: E501
    rig: Rig,
) -> None:
    # A probation long enough to strike while the job runs.
    bundle = build_bundle(rig.root / "build", rig.keys.release, gate={"probation_s": 4})
    tap = CommandTap(rig.broker.url)
    with EventCollector(rig.broker.url, DEV) as events:
        events.wait_online()
        args = ["rollout", "start", str(bundle), "--target", DEV, "--waves", "100%",
                "--max-failure-rate", "0", "--wave-timeout", "120", "--wait"]  # fmt: skip
        rollout = subprocess.Popen(
            jetfleet_cmd(*args),
            env=rig.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deploy = tap.first()
            cid = _command_id(deploy)
            events.wait_state(cid, "PROBATION", timeout=120)
            topic = Topics().device_cmd(DEV)
            publish(rig.broker.url, topic, deploy)  # the exact bytes, again
            inner = base64.b64decode(json.loads(deploy)["payload"])
            junk = sign(inner, COMMAND_PAYLOAD_TYPE, []).encode()  # its id, no signature
            publish(rig.broker.url, topic, junk)
            out, _ = rollout.communicate(timeout=180)
        finally:
            if rollout.poll() is None:
                rollout.kill()
            tap.close()
        assert rollout.returncode == 0, out + rig.agent.log()[-3000:]
        refusals = [e for e in events.for_command(cid) if e.refused_sha256]
        assert sorted(e.code or "" for e in refusals) == ["replay", "unsigned"], refusals
        assert all(e.state is JobState.REJECTED for e in refusals)
        own = [e.state for e in events.for_command(cid) if not e.refused_sha256]
        assert own[-1] is JobState.SUCCEEDED and JobState.REJECTED not in own

    status = run_cli(rig.env, "rollout", "list", "--output", "json")
    assert status.returncode == 0, status.stderr
    (listed,) = json.loads(status.stdout)
    assert listed["state"] == "succeeded", listed
    devices = json.loads(run_cli(rig.env, "devices", "--output", "json").stdout)
    assert devices[0]["models"]["detector"]["active"] == "1.0.0"
