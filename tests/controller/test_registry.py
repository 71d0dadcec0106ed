"""The fleet registry, fed from retained status and events (on SQLite and PostgreSQL:
the `db` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fleet import SimFleet, make_devices, wait_until

from controller.fleet.registry import Registry, TargetError, open_db, sync_from_broker
from controller.mqtt import ControllerMqtt, MqttOptions
from controller.sandbox.localbroker import LocalMosquitto
from controller.security.keystore import init_keys
from protocol.errors import MessageError
from protocol.messages import DeviceStatus, JobEvent, JobState


def status(device: str, **kw: object) -> bytes:
    fields: dict[str, object] = {"device_id": device, "online": True, "groups": ["fleet"]}
    fields.update(kw)
    return DeviceStatus.new(**fields).encode()


def event(device: str, seq: int, state: str, cid: str = "c1") -> bytes:
    return JobEvent.new(command_id=cid, device_id=device, state=state, seq=seq).encode()


T = "jetfleet/v1/devices/{}/{}"


def test_status_creates_the_device_with_groups_hardware_and_models(db: str) -> None:
    reg = Registry.open(db)
    reg.handle(
        T.format("robot-1", "status"),
        status(
            "robot-1",
            groups=["warehouse-a", "canary"],
            hardware={"device_model": "NVIDIA Jetson AGX Orin", "tensorrt": "10.3.0"},
            models={"detector": {"active": "2.0.0", "previous": "1.0.0"}},
            agent_version="0.1.0",
        ),
    )
    d = reg.get("robot-1")
    assert d is not None and d.online
    assert d.groups == ["warehouse-a", "canary"]
    assert d.hardware["tensorrt"] == "10.3.0"
    assert d.active_version("detector") == "2.0.0"
    assert d.previous_version("detector") == "1.0.0"
    # The registry persists: a new process sees the same fleet.
    again = Registry.open(db).get("robot-1")
    assert again is not None and again.to_dict() == d.to_dict()


def test_events_advance_the_job_in_flight_and_stale_ones_are_ignored(db: str) -> None:
    reg = Registry.open(db)
    reg.handle(T.format("robot-1", "status"), status("robot-1", last_seq=3))
    reg.handle(T.format("robot-1", "events"), event("robot-1", 4, "BUILDING"))
    reg.handle(T.format("robot-1", "events"), event("robot-1", 2, "RECEIVED"))  # late duplicate
    d = reg.get("robot-1")
    assert d is not None and d.job is not None
    assert d.job["state"] == JobState.BUILDING.value and d.last_seq == 4


def test_a_device_cannot_speak_for_another_device(db: str) -> None:
    reg = Registry.open(db)
    with pytest.raises(MessageError, match="claims device 'robot-2'"):
        reg.handle(T.format("robot-1", "status"), status("robot-2"))
    with pytest.raises(MessageError, match="claims device 'robot-2'"):
        reg.handle(T.format("robot-1", "events"), event("robot-2", 1, "RECEIVED"))
    assert reg.devices() == []


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"schema": "jetfleet.status/v2", "device_id": "robot-1"}',
        b'{"device_id": "robot-1", "online": true}',
        b"\xff\xfe",
    ],
)
def test_malformed_status_is_rejected_with_a_reason(tmp_path: Path, payload: bytes) -> None:
    reg = Registry.open(tmp_path / "c.db")
    with pytest.raises(MessageError):
        reg.handle(T.format("robot-1", "status"), payload)


def test_cleared_retained_status_forgets_the_device(db: str) -> None:
    reg = Registry.open(db)
    reg.handle(T.format("robot-1", "status"), status("robot-1"))
    reg.handle(T.format("robot-1", "status"), b"")
    assert reg.get("robot-1") is None


def test_targets_resolve_to_sorted_ids(db: str) -> None:
    reg = Registry.open(db)
    for d, groups in (("robot-2", ["a"]), ("robot-1", ["a", "b"]), ("robot-3", ["b"])):
        reg.handle(T.format(d, "status"), status(d, groups=groups))
    assert reg.resolve_target("all") == ["robot-1", "robot-2", "robot-3"]
    assert reg.resolve_target("group:b") == ["robot-1", "robot-3"]
    assert reg.resolve_target("robot-3,robot-9") == ["robot-3", "robot-9"]
    assert reg.unknown(["robot-3", "robot-9"]) == ["robot-9"]
    with pytest.raises(TargetError, match="no known device is in group 'c'"):
        reg.resolve_target("group:c")
    with pytest.raises(TargetError, match="named twice"):
        reg.resolve_target("robot-1,robot-1")
    with pytest.raises(MessageError, match="invalid device id"):
        reg.resolve_target("Robot 1")


def test_sync_reads_every_retained_status_and_the_will_marks_a_device_offline(
    tmp_path: Path, mosquitto: LocalMosquitto
) -> None:
    keys = init_keys(tmp_path / "keys")
    reg = Registry.open(tmp_path / "c.db")
    with SimFleet(mosquitto.url, keys.trust, make_devices(20, groups=["yard"])) as fleet:
        with ControllerMqtt(MqttOptions(broker=mosquitto.url)) as m:
            assert sync_from_broker(reg, m) == 20
        assert all(d.online for d in reg.devices("yard"))
        fleet.disconnect_device("robot-0007")

        def offline() -> bool:
            with ControllerMqtt(MqttOptions(broker=mosquitto.url)) as m:
                sync_from_broker(reg, m)
            rec = reg.get("robot-0007")
            return rec is not None and not rec.online

        wait_until(offline, timeout=15, what="the will message")
        assert sum(d.online for d in reg.devices()) == 19


def test_devices_command_prints_json_and_filters_by_group(
    tmp_path: Path, mosquitto: LocalMosquitto
) -> None:
    from fleet import cli_env, run_cli

    keys = init_keys(tmp_path / "keys")
    devs = make_devices(3)
    devs[0].groups = ["canary", "fleet"]
    with SimFleet(mosquitto.url, keys.trust, devs):
        env = cli_env(tmp_path, mosquitto.url, tmp_path / "keys")
        out = run_cli(env, "devices", "--output", "json")
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert [d["id"] for d in listed] == ["robot-0000", "robot-0001", "robot-0002"]
        assert listed[0]["models"]["detector"]["active"] == "1.0.0"
        assert listed[0]["stale"] is False
        canary = json.loads(run_cli(env, "devices", "--group", "canary", "-o", "json").stdout)
        assert [d["id"] for d in canary] == ["robot-0000"]
        table = run_cli({**env, "COLUMNS": "200"}, "devices")
        assert "robot-0002" in table.stdout and "detector 1.0.0" in table.stdout
        assert run_cli(env, "devices", "--group", "Bad Group").returncode == 2
    # Broker gone: the last known fleet, flagged stale in the table too, with the reason
    # on stderr, and exit 1 (a script must not take it for the current state).
    mosquitto.stop()
    out = run_cli(env, "devices", "--output", "json", "--timeout", "1")
    assert out.returncode == 1
    assert all(d["stale"] for d in json.loads(out.stdout))
    assert "showing the last known state" in out.stderr
    table = run_cli({**env, "COLUMNS": "200"}, "devices", "--timeout", "1")
    assert table.returncode == 1
    assert "NOT REFRESHED (broker unreachable): last known state" in table.stdout
    assert "? (was yes)" in table.stdout and "[green]" not in table.stdout


class CountingRegistry(Registry):
    """A registry that remembers every topic it was handed, in order."""

    def __init__(self, path: Path) -> None:
        super().__init__(open_db(path))
        self.topics_seen: list[str] = []

    def handle(self, topic: str, payload: bytes) -> DeviceStatus | JobEvent | None:
        self.topics_seen.append(topic)
        return super().handle(topic, payload)


def test_sync_on_mosquitto_reads_each_status_once_and_asks_by_name_only_for_devices_the_wildcard_missed(  # noqa: E501
    tmp_path: Path, mosquitto: LocalMosquitto
) -> None:
    reg = CountingRegistry(tmp_path / "c.db")
    # robot-9 is known from an event but has no retained status (e.g. never finished
    # starting); robot-3 is named by an operator and has never connected.
    reg.handle(T.format("robot-9", "events"), event("robot-9", 1, "RECEIVED"))
    with ControllerMqtt(MqttOptions(broker=mosquitto.url)) as m:
        for d in ("robot-1", "robot-2"):
            m.publish(T.format(d, "status"), status(d), retain=True)
    reg.topics_seen.clear()
    with ControllerMqtt(MqttOptions(broker=mosquitto.url)) as m:
        assert sync_from_broker(reg, m, device_ids=["robot-1", "robot-3"]) == 2
    # Mosquitto matches retained statuses against the wildcard: read once each, no
    # duplicate from a by-name subscription; the by-name pass found nothing more.
    assert sorted(reg.topics_seen) == [T.format("robot-1", "status"), T.format("robot-2", "status")]
    assert reg.get("robot-9") is not None and reg.get("robot-3") is None
