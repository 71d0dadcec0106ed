"""`jetfleet broker config`: the files it writes, the inputs it refuses, and the optional
controllers' listener that pins device client ids (checked on a real Mosquitto)."""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from controller.cli.broker import app as broker_app
from controller.security import brokerconfig, pki
from protocol.topics import Topics
from tests.transport.brokers import FleetPki, Probe, start_tls_broker

runner = CliRunner()
T = Topics()
V311 = mqtt.MQTTv311  # clean_session=False: a session that outlives the connection


@pytest.fixture
def small_pki(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    pki.init_ca(root)
    pki.issue_server(root, ["127.0.0.1"])
    pki.issue_controller(root)
    pki.issue_device(root, "robot-1")
    return root


def test_acl_gives_devices_their_own_lanes_and_controllers_the_tree() -> None:
    acl = brokerconfig.render_acl(
        prefix="acme/fleet",
        controllers=["controller", "ingest"],
        device_groups={"robot-1": ["dock", "canary"], "robot-2": []},
    )
    lines = [ln for ln in acl.splitlines() if ln and not ln.startswith("#")]
    assert lines == [
        "user controller",
        "topic readwrite acme/fleet/#",
        "user ingest",
        "topic readwrite acme/fleet/#",
        "user robot-1",
        "topic read acme/fleet/groups/dock/cmd",
        "topic read acme/fleet/groups/canary/cmd",
        "pattern read acme/fleet/devices/%u/cmd",
        "pattern write acme/fleet/devices/%u/events",
        "pattern write acme/fleet/devices/%u/status",
        "pattern write acme/fleet/devices/%u/telemetry",
    ]


@pytest.mark.parametrize("prefix", ["jetfleet/#", "/jetfleet", "jetfleet/", "a/%u", "a b", "$SYS"])
def test_unsafe_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(brokerconfig.BrokerConfigError, match="topic prefix"):
        brokerconfig.render_acl(prefix=prefix)


def test_a_controller_named_in_the_groups_file_is_refused() -> None:
    with pytest.raises(brokerconfig.BrokerConfigError, match="both a controller and a device"):
        brokerconfig.render_acl(device_groups={"controller": ["dock"]})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("devices = [", "not valid TOML"),
        ("[robots]\nrobot-1 = []", "needs a [devices] table"),
        ('[devices]\n"Robot_1" = ["dock"]', "invalid device id 'Robot_1'"),
        ('[devices]\nrobot-1 = ["Dock A"]', "invalid group name 'Dock A'"),
        ('[devices]\nrobot-1 = "dock"', "groups must be a list"),
    ],
)
def test_bad_groups_files_name_the_file_and_the_problem(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(text)
    with pytest.raises(brokerconfig.BrokerConfigError) as e:
        brokerconfig.load_groups_file(path)
    assert str(path) in str(e.value) and reason in str(e.value)


def test_controller_identity_issued_to_a_device_is_refused(small_pki: Path, tmp_path: Path) -> None:
    with pytest.raises(brokerconfig.BrokerConfigError, match="issued to a device"):
        brokerconfig.write_broker_config(tmp_path / "out", small_pki, controllers=["robot-1"])


def test_missing_broker_certificate_says_how_to_make_one(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    pki.init_ca(root)
    with pytest.raises(brokerconfig.BrokerConfigError, match="jetfleet pki issue-server"):
        brokerconfig.write_broker_config(tmp_path / "out", root)


def test_cli_writes_config_acl_and_certs_with_a_private_key(
    small_pki: Path, tmp_path: Path
) -> None:
    groups = tmp_path / "devices.toml"
    groups.write_text('[devices]\nrobot-1 = ["dock"]\n')
    out = tmp_path / "etc"
    r = runner.invoke(
        broker_app,
        ["config", "--out", str(out), "--pki", str(small_pki), "--groups-file", str(groups),
         "--port", "18883", "--install-dir", "/etc/mosquitto/jetfleet", "--output", "json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    files = json.loads(r.stdout)
    assert files["devices_with_groups"] == 1 and files["unissued_controllers"] == []
    conf = (out / "mosquitto.conf").read_text()
    for line in (
        "listener 18883",
        "cafile /etc/mosquitto/jetfleet/certs/ca.crt",
        "acl_file /etc/mosquitto/jetfleet/acl",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
    ):
        assert line in conf.splitlines()
    assert "topic read jetfleet/v1/groups/dock/cmd" in (out / "acl").read_text()
    assert stat.S_IMODE((out / "certs" / "server.key").stat().st_mode) == 0o600
    assert (out / "certs" / "ca.crt").read_bytes() == (small_pki / "ca.crt").read_bytes()

    bad = runner.invoke(broker_app, ["config", "--out", str(out), "--pki", str(small_pki),
                                     "--prefix", "jetfleet/#"])  # fmt: skip
    assert bad.exit_code == 2 and "topic prefix 'jetfleet/#'" in bad.output


def test_pinned_client_ids_stop_a_device_taking_over_another_devices_session(
    tmp_path: Path, fleet_pki: FleetPki
) -> None:
    from controller.sandbox.localbroker import free_port

    ctl_port = free_port()
    broker = start_tls_broker(tmp_path / "b", fleet_pki, controller_port=ctl_port,
                              controller_bind="127.0.0.1")  # fmt: skip
    made: list[Probe] = []

    def connect(name: str, port: int, **kw: object) -> Probe:
        p = Probe(broker.host, port, fleet_pki.tls(name), **kw)  # type: ignore[arg-type]
        assert p.connect(), broker.log[-1500:]
        made.append(p)
        return p

    try:
        # robot-b has a persistent session with its command subscription, then goes away.
        b = connect("robot-b", broker.port, client_id="robot-b", clean=False, protocol=V311)
        b.subscribe(T.device_cmd("robot-b"))
        b.close()
        # robot-a claims robot-b's client id: the broker renames it to robot-a instead.
        connect("robot-a", broker.port, client_id="robot-b", clean=False, protocol=V311)
        # Two controller processes under one identity coexist on the controllers' port.
        ctl1 = connect("controller", ctl_port, client_id="rollout-1")
        ctl2 = connect("controller", ctl_port, client_id="rollout-2")
        ctl1.publish(T.device_cmd("robot-b"), b"queued for b")
        back = connect("robot-b", broker.port, client_id="robot-b", clean=False, protocol=V311)
        assert [m.payload for m in back.receive(5)] == [b"queued for b"]
        assert not ctl1.disconnected.is_set() and not ctl2.disconnected.is_set()
        assert "as robot-a (" in broker.log and "as rollout-2 (" in broker.log
    finally:
        for p in made:
            p.close()
        broker.stop()


def test_pinned_ids_are_no_default_controllers_must_move_and_devices_must_not_reach_their_port(
    tmp_path: Path, fleet_pki: FleetPki
) -> None:
    """Why `--controller-port` stays opt-in (docs/brokers.md): the generator cannot know
    the network. (1) Controllers left on the devices' port all become "controller" and
    kick each other off; (2) a device that can reach the controllers' port takes over
    another device's session there, since client ids are broker-wide."""
    from controller.sandbox.localbroker import free_port

    ctl_port = free_port()
    broker = start_tls_broker(tmp_path / "b", fleet_pki, controller_port=ctl_port,
                              controller_bind="127.0.0.1")  # fmt: skip
    made: list[Probe] = []

    def connect(name: str, port: int, **kw: object) -> Probe:
        p = Probe(broker.host, port, fleet_pki.tls(name), **kw)  # type: ignore[arg-type]
        assert p.connect(), broker.log[-1500:]
        made.append(p)
        return p

    try:
        ctl1 = connect("controller", broker.port, client_id="jetfleet-rollout-r-1")
        connect("controller", broker.port, client_id="jetfleet-rollout-r-2")
        assert ctl1.disconnected.wait(5), "the second controller should have taken the id"

        b = connect("robot-b", broker.port, client_id="robot-b", clean=False, protocol=V311)
        b.subscribe(T.device_cmd("robot-b"))
        b.close()
        connect("robot-a", ctl_port, client_id="robot-b", clean=False, protocol=V311)
        ops = connect("controller", ctl_port, client_id="ops")
        ops.publish(T.device_cmd("robot-b"), b"queued for b")
        time.sleep(0.5)
        back = connect("robot-b", broker.port, client_id="robot-b", clean=False, protocol=V311)
        assert back.receive(2) == []  # consumed under robot-a's name, denied, lost
    finally:
        for p in made:
            p.close()
        broker.stop()


def test_a_burst_of_events_beyond_mosquittos_default_queue_all_reach_a_slow_controller(
    probe: Callable[..., Probe],
) -> None:
    controller = probe("controller")
    got: list[bytes] = []
    stall = threading.Event()

    def on_message(client: object, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if not stall.is_set():
            stall.set()
            time.sleep(1.0)  # a controller busy in SQLite while a wave reports back
        got.append(msg.payload)

    controller.client.on_message = on_message
    controller.subscribe(T.all_events())
    device = probe("robot-a")
    n = 2500  # Mosquitto's default queue is 1000: it would drop the rest
    infos = [device.client.publish(T.events("robot-a"), b"%d" % i, qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
    deadline = time.monotonic() + 15
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got) == n
    assert got == [b"%d" % i for i in range(n)]  # in order, nothing lost
