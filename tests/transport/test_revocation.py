"""`jetfleet pki revoke`: a stolen robot is cut off at the TLS handshake, every certificate
it was ever issued included, while the rest of the fleet keeps connecting."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from controller import pki
from controller.cli.pki import app as pki_app
from protocol.transport import BrokerAddress, diagnose_tls
from tests.transport.brokers import Probe, make_fleet_pki, start_tls_broker


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
