"""`jetfleet pki revoke`: a stolen robot is cut off at the TLS handshake, every certificate
it was ever issued included, while the rest of the fleet keeps connecting."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from typer.testing import CliRunner

from agent import doctor
from controller.cli.pki import app as pki_app
from controller.security import pki
from protocol.transport import BrokerAddress, diagnose_tls
from tests.agent.harness import AgentProcess, write_agent_config
from tests.transport.brokers import GROUPS, Probe, make_fleet_pki, start_tls_broker


def test_revoked_robot_cannot_connect_with_any_of_its_certificates(tmp_path: Path) -> None:
    fleet = make_fleet_pki(tmp_path / "pki")  # a private PKI: revocation must not leak
    old_b = fleet.certs["robot-b"]
    renewed = pki.issue_device(fleet.root, "robot-b", out_dir=tmp_path / "renewed")
    revocation = pki.revoke(fleet.root, "robot-b")
    assert set(revocation.serials) == {old_b.serial, renewed.serial}
    crl = x509.load_pem_x509_crl((fleet.root / pki.CRL).read_bytes())
    assert {r.serial_number for r in crl} == {old_b.serial, renewed.serial}

    broker = start_tls_broker(tmp_path / "b", fleet)
    try:
        addr = BrokerAddress(broker.host, broker.port, True)
        for cert in (old_b, renewed):
            msg = diagnose_tls(addr, str(fleet.ca), str(cert.cert), str(cert.key))
            assert msg is not None and f"refused client certificate {cert.cert}" in msg
            assert "revoked" in msg
        # The rest of the fleet is unaffected.
        a = fleet.certs["robot-a"]
        assert diagnose_tls(addr, str(fleet.ca), str(a.cert), str(a.key)) is None
        p = Probe(broker.host, broker.port, fleet.tls("robot-a"))
        assert p.connect()
        p.close()
    finally:
        broker.stop()


def test_a_robot_reissued_after_revocation_connects_again(tmp_path: Path) -> None:
    fleet = make_fleet_pki(tmp_path / "pki")
    pki.revoke(fleet.root, "robot-c")
    back = pki.issue_device(fleet.root, "robot-c", out_dir=tmp_path / "back")
    broker = start_tls_broker(tmp_path / "b", fleet)
    try:
        addr = BrokerAddress(broker.host, broker.port, True)
        assert diagnose_tls(addr, str(back.ca), str(back.cert), str(back.key)) is None
        old = fleet.certs["robot-c"]
        assert diagnose_tls(addr, str(old.ca), str(old.cert), str(old.key)) is not None
    finally:
        broker.stop()


def test_cli_revoke_and_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    root = tmp_path / "pki"
    pki.init_ca(root)
    dev = pki.issue_device(root, "robot-9")
    r = runner.invoke(pki_app, ["revoke", "robot-9", "--pki", str(root)])
    assert r.exit_code == 0 and "revoked 1 certificate(s) of 'robot-9'" in r.output
    # The broker holds a copy of the CRL: the operator is told the revocation is not live.
    assert "'robot-9' can still connect: the broker checks its own copy of the CRL" in r.output
    assert "Regenerate the broker config" in r.output and "restart the broker" in r.output
    r = runner.invoke(pki_app, ["verify", str(dev.cert), "--pki", str(root)])
    assert r.exit_code == 3 and "has been revoked" in r.output
    r = runner.invoke(pki_app, ["revoke", "robot-unknown", "--pki", str(root)])
    assert r.exit_code == 2 and "never issued a certificate to 'robot-unknown'" in r.output


def test_crl_lives_as_long_as_the_ca_and_numbers_increase(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path, days=400)
    pki.issue_device(tmp_path, "robot-1")
    first = x509.load_pem_x509_crl((tmp_path / pki.CRL).read_bytes())
    pki.revoke(tmp_path, "robot-1")
    second = x509.load_pem_x509_crl((tmp_path / pki.CRL).read_bytes())
    assert second.next_update_utc == ca.not_after
    n1 = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    n2 = second.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert n2 == n1 + 1
    assert second.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]


def test_a_crl_not_signed_by_the_fleet_ca_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "a")
    pki.init_ca(tmp_path / "b")
    pki.issue_device(tmp_path / "a", "robot-1")
    (tmp_path / "a" / pki.CRL).write_bytes((tmp_path / "b" / pki.CRL).read_bytes())
    with pytest.raises(pki.PkiError, match="was not signed by the fleet CA"):
        pki.revoke(tmp_path / "a", "robot-1")


def _agent_config(tmp: Path, url: str, cert: pki.IssuedCert, trust: Path) -> Path:
    return write_agent_config(
        tmp / f"{cert.common_name}.toml",
        device_id=cert.common_name,
        groups=GROUPS.get(cert.common_name, []),
        broker_url=url,
        data_dir=tmp / f"data-{cert.common_name}",
        trust_root=trust,
        extra={"broker": {"ca": str(cert.ca), "cert": str(cert.cert), "key": str(cert.key)}},
    )


def test_doctor_says_revoked_when_the_brokers_crl_names_the_certificate(
    tmp_path: Path, trust_material: Any
) -> None:
    fleet = make_fleet_pki(tmp_path / "pki")
    pki.revoke(fleet.root, "robot-b")
    broker = start_tls_broker(tmp_path / "b", fleet)
    try:
        cfg = _agent_config(
            tmp_path, broker.url, fleet.certs["robot-b"], trust_material.write(tmp_path / "t.json")
        )
        result = doctor.check_broker(doctor.load_config(cfg), timeout=5)
    finally:
        broker.stop()
    assert result.status == doctor.FAIL
    assert result.detail.startswith(f"127.0.0.1:{broker.port} closed the TLS connection before")
    assert "it has been revoked" in result.detail
    assert "jetfleet pki issue robot-b" in result.fix


class Relay:
    """A TCP relay standing for the broker's address, so a test can swap the broker
    behind it (restart it with a new CRL) while the address always answers."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                if self.server.fileno() < 0:
                    return
                continue
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def switch_to(self, target_port: int) -> None:
        """New connections go to `target_port`; the open ones are cut."""
        self.target = target_port
        for s in self.open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    def close(self) -> None:
        self.server.close()
        self.switch_to(self.target)


@pytest.mark.slow
def test_a_connected_robot_revoked_later_logs_revoked_on_its_failed_reconnects(
    tmp_path: Path, trust_material: Any
) -> None:
    """Connected first, then revoked: the broker restarts with the new CRL, and each failed
    reconnect must say "revoked", not a bare 'Unspecified error' once a second."""
    fleet = make_fleet_pki(tmp_path / "pki")
    cert = fleet.certs["robot-b"]
    before = start_tls_broker(tmp_path / "b1", fleet)
    relay = Relay(before.port)
    url = f"mqtts://127.0.0.1:{relay.port}"
    cfg = _agent_config(tmp_path, url, cert, trust_material.write(tmp_path / "t.json"))
    after = None
    try:
        with AgentProcess(cfg) as agent:
            wait_for_log(agent, "event='mqtt_connected'")
            # The operator revokes it, regenerates the broker config and restarts the broker.
            pki.revoke(fleet.root, "robot-b")
            after = start_tls_broker(tmp_path / "b2", fleet)
            relay.switch_to(after.port)
            before.stop()
            wait_for_log(agent, "it has been revoked", timeout=15)
            log = agent.log()
    finally:
        relay.close()
        before.stop()
        if after is not None:
            after.stop()
    after_cut = log[log.index("event='mqtt_disconnected'") :]
    assert "event='mqtt_tls_problem'" in after_cut
    assert f"the broker refused client certificate {cert.cert}: it has been revoked" in after_cut
    # Each failed attempt after that carries the reason, not a bare 'Unspecified error'.
    assert "event='mqtt_disconnected' reason='Unspecified error' tls=" in after_cut


def wait_for_log(agent: AgentProcess, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in agent.log():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{agent.log()[-3000:]}"
        time.sleep(0.2)
