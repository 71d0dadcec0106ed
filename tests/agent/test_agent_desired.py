"""Desired state (issue 13): real agents converge to retained, operator-signed releases
and pins on a real Mosquitto, with no controller process running."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from protocol.keys import SigningKey
from protocol.messages import DeviceStatus, JobEvent, JobState
from protocol.release import DesiredModel, Pins, Release, sign_release
from protocol.topics import Topics
from protocol.trust import build_trust_root
from tests.agent.harness import (
    AgentProcess,
    EventCollector,
    build_bundle,
    engine_link_state,
    make_command,
    publish,
    sign_command,
    write_agent_config,
)

pytestmark = pytest.mark.slow
T = Topics()
GROUP = "lab"


def desired(bundle: Path, version: str) -> DesiredModel:
    data = bundle.read_bytes()
    return DesiredModel(
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        url=bundle.resolve().as_uri(),
        size=len(data),
    )


def release(
    version: int,
    keys: list[SigningKey],
    group: str = GROUP,
    retry: bool = False,
    **models: DesiredModel,
) -> bytes:
    doc = Release.new(
        group=group,
        version=version,
        issued_at=datetime.now(timezone.utc),
        models=models,
        retry=retry,
    )
    return sign_release(doc, keys).encode()


def pins(device: str, version: int, keys: list[SigningKey], **models: DesiredModel) -> bytes:
    doc = Pins.new(
        device=device, version=version, issued_at=datetime.now(timezone.utc), models=models
    )
    return sign_release(doc, keys).encode()


def put(broker_url: str, topic: str, payload: bytes) -> None:
    """Publish retained, as `jetfleet release` does."""
    publish(broker_url, topic, payload, retain=True)


def config(tmp: Path, device: str, broker_url: str, trust: Path, groups: list[str]) -> Path:
    return write_agent_config(
        tmp / device / "agent.toml",
        device_id=device,
        groups=groups,
        broker_url=broker_url,
        data_dir=tmp / device / "data",
        trust_root=trust,
        health="true",
        extra={"desired": {"jitter_s": 0.3}},
    )


def converge_events(events: EventCollector, version: str) -> list[JobEvent]:
    return [e for e in events.events if e.origin == "release" and e.version == version]


def wait_active(events: EventCollector, version: str, timeout: float = 90) -> DeviceStatus:
    def ok(s: DeviceStatus) -> bool:
        slot = s.models.get("detector")
        return s.online and slot is not None and slot.active == version and s.job is None

    return events.wait_status(ok, timeout)


@pytest.fixture
def bundles(tmp_path: Path, trust_material) -> dict[str, DesiredModel]:
    wrong = {"output.y": np.full((4, 16), 7.0, dtype=np.float32)}
    out = {}
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        out[v] = desired(build_bundle(tmp_path, trust_material.release, version=v), v)
    bad = build_bundle(tmp_path, trust_material.release, version="2.5.0", golden_override=wrong)
    out["bad"] = desired(bad, "2.5.0")
    return out


@pytest.fixture
def trust_file(tmp_path: Path, trust_material) -> Path:
    return trust_material.write(tmp_path / "trust.json")


@pytest.fixture
def robot(tmp_path: Path, mosquitto, trust_file) -> Iterator[tuple[Path, EventCollector]]:
    cfg = config(tmp_path, "robot-1", mosquitto.url, trust_file, [GROUP])
    with EventCollector(mosquitto.url, "robot-1") as events:
        yield cfg, events


def test_robots_stopped_or_new_converge_to_the_release_with_no_controller(
    tmp_path: Path, mosquitto, trust_material, trust_file, bundles
) -> None:
    old = config(tmp_path, "robot-1", mosquitto.url, trust_file, [GROUP])
    new = config(tmp_path, "robot-2", mosquitto.url, trust_file, [GROUP])
    with (
        EventCollector(mosquitto.url, "robot-1") as ev1,
        EventCollector(mosquitto.url, "robot-2") as ev2,
    ):
        with AgentProcess(old):
            ev1.wait_online()
        # Set while robot-1 is stopped and before robot-2 ever started; nothing else runs.
        rel = release(1, [trust_material.operator], detector=bundles["1.0.0"])
        put(mosquitto.url, T.group_release(GROUP), rel)
        with AgentProcess(old) as a1, AgentProcess(new) as a2:
            s1 = wait_active(ev1, "1.0.0")
            s2 = wait_active(ev2, "1.0.0")
            assert s1.desired is not None and s1.desired.releases == {GROUP: 1}, a1.log()[-2000:]
            assert s2.desired is not None and s2.desired.models == {"detector": "1.0.0"}
            for ev in (ev1, ev2):
                done = [e for e in converge_events(ev, "1.0.0") if e.state.terminal]
                assert [e.state for e in done] == [JobState.SUCCEEDED], a2.log()[-2000:]


def test_pin_holds_through_a_group_release_and_unpin_converges(
    mosquitto, trust_material, robot, bundles
) -> None:
    cfg, events = robot
    op = [trust_material.operator]
    publish(
        mosquitto.url,
        T.group_release(GROUP),
        release(1, op, detector=bundles["1.0.0"]),
        retain=True,
    )
    put(mosquitto.url, T.device_pins("robot-1"), pins("robot-1", 1, op, detector=bundles["1.0.0"]))
    with AgentProcess(cfg):
        wait_active(events, "1.0.0")
        put(mosquitto.url, T.group_release(GROUP), release(2, op, detector=bundles["2.0.0"]))
        s = events.wait_status(lambda s: s.desired is not None and s.desired.releases == {GROUP: 2})
        assert s.desired is not None and s.desired.models == {"detector": "1.0.0"}
        assert s.models["detector"].active == "1.0.0" and not converge_events(events, "2.0.0")
        put(mosquitto.url, T.device_pins("robot-1"), pins("robot-1", 2, op))
        wait_active(events, "2.0.0")


def tries_of(events: EventCollector, version: str) -> int:
    return sum(1 for e in converge_events(events, version) if e.state is JobState.RECEIVED)


def test_gate_failure_is_held_back_without_retry_and_a_newer_release_is_tried(
    mosquitto, trust_material, robot, bundles
) -> None:
    cfg, events = robot
    op = [trust_material.operator]
    topic = T.group_release(GROUP)
    put(mosquitto.url, topic, release(1, op, detector=bundles["1.0.0"]))
    with AgentProcess(cfg):
        wait_active(events, "1.0.0")
        put(mosquitto.url, topic, release(2, op, detector=bundles["bad"]))
        s = events.wait_status(
            lambda s: s.desired is not None and "detector" in s.desired.held_back, timeout=90
        )
        held = s.desired.held_back["detector"] if s.desired else None
        assert held is not None and (held.version, held.code) == ("2.5.0", "accuracy")
        assert s.models["detector"].active == "1.0.0"
    with AgentProcess(cfg):  # a restart is no reason to try it again either
        events.wait_status(lambda s: s.online and s.desired is not None and s.job is None)
        time.sleep(2.0)  # past the convergence jitter (0.3 s) and a settle round
        assert tries_of(events, "2.5.0") == 1
        # An explicit retry (`jetfleet release retry`) tries it once more.
        put(mosquitto.url, topic, release(3, op, retry=True, detector=bundles["bad"]))
        events.wait(lambda: tries_of(events, "2.5.0") == 2, 30, "the explicit retry")
        s = events.wait_status(
            lambda s: s.desired is not None and s.desired.releases == {GROUP: 3} and s.job is None
            and "detector" in s.desired.held_back, timeout=90,
        )  # fmt: skip
        put(mosquitto.url, topic, release(4, op, detector=bundles["3.0.0"]))
        s = wait_active(events, "3.0.0")
        assert s.desired is not None and s.desired.held_back == {}
    assert tries_of(events, "2.5.0") == 2


def _refusals(events: EventCollector, payload: bytes) -> list[JobEvent]:
    digest = hashlib.sha256(payload).hexdigest()
    return [e for e in events.events if e.refused_sha256 == digest]


def test_stale_misaddressed_unsigned_wrongly_signed_and_retired_key_documents_are_refused(
    tmp_path: Path, mosquitto, trust_material, robot, bundles
) -> None:
    cfg, events = robot
    op = [trust_material.operator]
    topic = T.group_release(GROUP)
    put(mosquitto.url, topic, release(2, op, detector=bundles["1.0.0"]))
    unsigned = json.loads(release(3, op, detector=bundles["2.0.0"]))
    unsigned["signatures"] = []
    attacks = [
        (topic, release(1, op, detector=bundles["2.0.0"]), "release_stale"),
        (topic, release(2, op, detector=bundles["2.0.0"]), "release_stale"),
        (topic, release(3, op, group="other", detector=bundles["2.0.0"]), "wrong_target"),
        (topic, json.dumps(unsigned).encode(), "unsigned"),
        (topic, release(3, [trust_material.release], detector=bundles["2.0.0"]), "wrong_role"),
        (topic, release(3, [SigningKey.generate()], detector=bundles["2.0.0"]), "bad_signature"),
        (
            T.device_pins("robot-1"),
            pins("robot-2", 1, op, detector=bundles["2.0.0"]),
            "wrong_target",
        ),
    ]
    with AgentProcess(cfg) as agent:
        wait_active(events, "1.0.0")
        for where, payload, code in attacks:
            put(mosquitto.url, where, payload)
            events.wait(lambda p=payload: bool(_refusals(events, p)), 20, code)
            got = _refusals(events, payload)[0]
            assert (got.state, got.code) == (JobState.REJECTED, code), got
        # Rotation retires the operator key; what it signs afterwards is refused.
        new_op = SigningKey.generate()
        root = build_trust_root(
            root=[trust_material.root],
            release=[trust_material.release],
            operator=[new_op],
            version=2,
            sign_with=[trust_material.root],
        )
        rotate = make_command("robot-1", "trust_update", {"trust_root": json.loads(root.encode())})
        publish(mosquitto.url, T.device_cmd("robot-1"), sign_command(rotate, op))
        events.wait_state(rotate.command_id, "SUCCEEDED")
        retired = release(3, op, detector=bundles["2.0.0"])
        put(mosquitto.url, topic, retired)
        events.wait(lambda: bool(_refusals(events, retired)), 20, "retired key refusal")
        assert _refusals(events, retired)[0].code == "bad_signature"
        s = events.wait_status(lambda s: s.online and s.trust_version == 2)
        assert s.models["detector"].active == "1.0.0" and s.desired is not None
        assert s.desired.releases == {GROUP: 2}
        assert not converge_events(events, "2.0.0"), agent.log()[-2000:]
        # The new operator key is good: that release converges.
        put(mosquitto.url, topic, release(3, [new_op], detector=bundles["2.0.0"]))
        wait_active(events, "2.0.0")


def test_two_groups_that_disagree_change_nothing_for_that_model(
    tmp_path: Path, mosquitto, trust_material, trust_file, bundles
) -> None:
    cfg = config(tmp_path, "robot-3", mosquitto.url, trust_file, ["lab", "dock"])
    op = [trust_material.operator]
    put(mosquitto.url, T.group_release("lab"), release(1, op, "lab", detector=bundles["1.0.0"]))
    put(mosquitto.url, T.group_release("dock"), release(1, op, "dock", detector=bundles["2.0.0"]))
    with EventCollector(mosquitto.url, "robot-3") as events, AgentProcess(cfg):
        s = events.wait_status(
            lambda s: s.desired is not None and bool(s.desired.releases.keys() == {"lab", "dock"})
        )
        events.wait(
            lambda: any(e.code == "release_conflict" for e in events.events), 20, "conflict"
        )
        s = events.wait_status(
            lambda s: s.online and s.desired is not None and "detector" in s.desired.conflicts
        )
        assert s.models.get("detector") is None and s.job is None
        assert not [e for e in events.events if e.origin is not None]


def test_kill9_mid_convergence_keeps_an_engine_and_converges_after_restart(
    mosquitto, trust_material, robot, bundles
) -> None:
    cfg, events = robot
    data = cfg.parent / "data"
    op = [trust_material.operator]
    topic = T.group_release(GROUP)
    put(mosquitto.url, topic, release(1, op, detector=bundles["1.0.0"]))
    with AgentProcess(cfg):
        wait_active(events, "1.0.0")
    agent = AgentProcess(cfg, env={"JETFLEET_AGENT_TEST_PAUSE_AT": "ACTIVATING"}).start()
    try:
        put(mosquitto.url, topic, release(2, op, detector=bundles["2.0.0"]))
        events.wait(
            lambda: any(e.state is JobState.ACTIVATING for e in converge_events(events, "2.0.0")),
            90,
            "ACTIVATING",
        )
    finally:
        agent.kill9()
    assert engine_link_state(data, "detector")[0] in ("1.0.0", "2.0.0")
    with AgentProcess(cfg):
        wait_active(events, "2.0.0")
    ends = [e for e in converge_events(events, "2.0.0") if e.state.terminal]
    assert [(e.state, e.code) for e in ends] == [
        (JobState.ROLLED_BACK, "interrupted"),
        (JobState.SUCCEEDED, None),
    ]
