"""The consumer contract (docs/integration.md) against a real agent and a real consumer.

The consumer is docs/examples/consumer.sh, a plain shell loop that knows nothing of
jetfleet's code: it follows `models/<name>/current`, loads the engine with ONNX Runtime
in a plain Python process, and writes `ack/<name>.json`. With `[activation]
ack_timeout_s` the agent waits for that word after each switch and rolls back without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from protocol.topics import Topics
from tests.agent.harness import (
    EventCollector,
    build_bundle,
    deploy_body,
    engine_link_state,
    make_command,
    publish,
    running_agent,
    sign_command,
    write_agent_config,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONSUMER = REPO / "docs" / "examples" / "consumer.sh"
DEV = "robot-ack"
# What a real service does with the engine: load it and run one inference, with ONNX
# Runtime itself (no jetfleet import). It fails on purpose for a version named in FAIL.
LOAD = (
    "import os, sys, numpy as np, onnxruntime as ort\n"
    "engine, version = sys.argv[1], sys.argv[2]\n"
    "if version in os.environ.get('FAIL', '').split(): sys.exit('refusing ' + version)\n"
    "s = ort.InferenceSession(engine, providers=['CPUExecutionProvider'])\n"
    "s.run(None, {'x': np.zeros((1, 64), np.float32)})\n"
)


def _config(tmp: Path, mosquitto, trust_material, timeout_s: float = 30.0) -> Path:
    return write_agent_config(
        tmp / "agent.toml",
        device_id=DEV,
        broker_url=mosquitto.url,
        data_dir=tmp / "data",
        trust_root=trust_material.write(tmp / "trust.json"),
        extra={"activation": {"ack_timeout_s": timeout_s}},
    )


@contextmanager
def consumer(data: Path, model: str, fail: str = "") -> Iterator[subprocess.Popen[bytes]]:
    load = [sys.executable, "-c", LOAD]
    proc = subprocess.Popen(
        ["sh", str(CONSUMER), str(data / "models" / model), str(data / "ack" / f"{model}.json"),
         *load],
        env={**os.environ, "FAIL": fail},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _deploy(events: EventCollector, mosquitto, trust_material, bundle: Path) -> object:
    cmd = make_command(DEV, "deploy", deploy_body(bundle))
    publish(mosquitto.url, Topics().device_cmd(DEV), sign_command(cmd, trust_material.operator))
    return events.wait_terminal(cmd.command_id, timeout=120)


def _ack(data: Path, model: str) -> dict:
    return json.loads((data / "ack" / f"{model}.json").read_text())


def test_a_consumer_in_another_process_is_switched_and_acknowledges(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _config(tmp_path, mosquitto, trust_material)
    data = tmp_path / "data"
    v1 = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    v2 = build_bundle(tmp_path, trust_material.release, version="1.1.0", seed=3)
    with EventCollector(mosquitto.url, DEV) as events, running_agent(cfg, events) as agent:
        with consumer(data, "detector"):
            for bundle, version in ((v1, "1.0.0"), (v2, "1.1.0")):
                final = _deploy(events, mosquitto, trust_material, bundle)
                assert final.state.value == "SUCCEEDED", (final, agent.log()[-3000:])
                assert _ack(data, "detector")["version"] == version
                assert (data / "models/detector/current/version").read_text() == version + "\n"
                assert final.gate and final.gate["acknowledged_by"] == str(
                    data / "ack/detector.json"
                )
        assert engine_link_state(data, "detector") == ("1.1.0", "1.0.0")


def test_a_consumer_that_never_acknowledges_is_rolled_back_after_the_deadline(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _config(tmp_path, mosquitto, trust_material, timeout_s=3.0)
    data = tmp_path / "data"
    v1 = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    v2 = build_bundle(tmp_path, trust_material.release, version="1.1.0", seed=3)
    with EventCollector(mosquitto.url, DEV) as events, running_agent(cfg, events) as agent:
        with consumer(data, "detector") as proc:
            assert _deploy(events, mosquitto, trust_material, v1).state.value == "SUCCEEDED"
            os.killpg(proc.pid, signal.SIGSTOP)  # hung: alive, but never answers again
            final = _deploy(events, mosquitto, trust_material, v2)
            os.killpg(proc.pid, signal.SIGCONT)
        assert (final.state.value, final.code) == ("ROLLED_BACK", "not_acknowledged"), (
            final,
            agent.log()[-3000:],
        )
        assert "within 3s" in (final.reason or "")
        assert "the last version acknowledged is 1.0.0" in (final.reason or "")
    assert engine_link_state(data, "detector") == ("1.0.0", None)
    assert not (data / "models/detector/versions/1.1.0").exists()


def test_a_consumer_that_fails_to_load_is_rolled_back_at_once(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _config(tmp_path, mosquitto, trust_material, timeout_s=60.0)
    data = tmp_path / "data"
    v1 = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    v2 = build_bundle(tmp_path, trust_material.release, version="1.1.0", seed=3)
    with (
        EventCollector(mosquitto.url, DEV) as events,
        running_agent(cfg, events) as agent,
        consumer(data, "detector", fail="1.1.0"),
    ):
        assert _deploy(events, mosquitto, trust_material, v1).state.value == "SUCCEEDED"
        t0 = time.monotonic()
        final = _deploy(events, mosquitto, trust_material, v2)
        assert time.monotonic() - t0 < 45  # not the 60 s deadline
        assert (final.state.value, final.code) == ("ROLLED_BACK", "health_failed"), (
            final,
            agent.log()[-3000:],
        )
        assert "reports 1.1.0 unhealthy: load failed" in (final.reason or "")
        # The consumer follows the way back and acknowledges the restored version.
        deadline = time.monotonic() + 10
        while _ack(data, "detector")["version"] != "1.0.0" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _ack(data, "detector") == {**_ack(data, "detector"), "version": "1.0.0",
                                          "healthy": True}  # fmt: skip
    assert engine_link_state(data, "detector") == ("1.0.0", None)


# A consumer in plain Python that answers on the agent's socket instead of a file: it
# knows the datagram layout from docs/integration.md, not from jetfleet's code.
SOCKET_CONSUMER = r"""
import os, socket, struct, sys, time
model_dir, sock_path = sys.argv[1], sys.argv[2]
model = os.path.basename(model_dir).encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
seen = None
while True:
    try:
        target = os.readlink(os.path.join(model_dir, "current"))
    except OSError:
        target = None
    if target and target != seen:
        d = os.path.join(model_dir, target)
        version = open(os.path.join(d, "version")).read().strip().encode()
        ok = os.path.getsize(os.path.join(d, "engine")) > 0
        reason = b"loaded"
        msg = (b"JFA1" + bytes([len(model)]) + model + bytes([len(version)]) + version
               + bytes([1 if ok else 0, len(reason)]) + reason)
        try:
            s.sendto(msg, sock_path)
            seen = target
        except OSError:
            pass
    time.sleep(0.1)
"""


def test_a_consumer_can_acknowledge_on_the_livestats_socket(
    tmp_path: Path, mosquitto, trust_material
) -> None:
    cfg = _config(tmp_path, mosquitto, trust_material)
    data = tmp_path / "data"
    bundle = build_bundle(tmp_path, trust_material.release, version="1.0.0")
    with EventCollector(mosquitto.url, DEV) as events, running_agent(cfg, events) as agent:
        proc = subprocess.Popen(
            [sys.executable, "-c", SOCKET_CONSUMER, str(data / "models" / "detector"),
             str(data / "run" / "live.sock")],
            env={"PATH": os.environ["PATH"]},
        )  # fmt: skip
        try:
            final = _deploy(events, mosquitto, trust_material, bundle)
        finally:
            proc.kill()
            proc.wait()
        assert final.state.value == "SUCCEEDED", (final, agent.log()[-3000:])
        assert final.gate and final.gate["acknowledged_by"] == "socket"
    assert not (data / "ack" / "detector.json").exists()
