"""The fleet PKI: what brokers need from the certificates, and what keeps identities apart."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from controller.cli.pki import app as pki_app
from controller.security import pki

runner = CliRunner()


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_p256_sha256_with_ca_constraints_key_usage_and_ten_years(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path)
    cert = _load(tmp_path / pki.CA_CERT)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    years = (ca.not_after - datetime.now(timezone.utc)).days / 365.25
    assert 9.9 < years <= 10.01


def test_private_keys_are_created_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pki.init_ca(tmp_path)
        dev = pki.issue_device(tmp_path, "robot-1")
    finally:
        os.umask(old)
    assert _mode(tmp_path / pki.CA_KEY) == 0o600
    assert _mode(dev.key) == 0o600
    assert _mode(dev.cert) == 0o644
    # No temporary key file is left next to them.
    assert sorted(p.name for p in dev.key.parent.iterdir()) == ["ca.crt", "robot-1.crt",
                                                                 "robot-1.key"]  # fmt: skip


def test_device_certificate_carries_the_device_id_and_client_auth_only(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    dev = pki.issue_device(tmp_path, "robot-0042", days=30)
    cert = _load(dev.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "robot-0042"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:jetfleet:device:robot-0042"
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(_load(tmp_path / pki.CA_CERT))
    assert 29 <= (dev.not_after - datetime.now(timezone.utc)).days <= 30
    assert dev.ca.read_bytes() == (tmp_path / pki.CA_CERT).read_bytes()


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl CLI not installed")
def test_openssl_accepts_each_certificate_for_its_purpose_only(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    dev = pki.issue_device(tmp_path, "robot-1")
    srv = pki.issue_server(tmp_path, ["broker.local", "10.0.0.5"])

    def verify(cert: Path, purpose: str) -> bool:
        r = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp_path / pki.CA_CERT), "-purpose", purpose,
             str(cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return r.returncode == 0

    assert verify(dev.cert, "sslclient") and not verify(dev.cert, "sslserver")
    assert verify(srv.cert, "sslserver") and not verify(srv.cert, "sslclient")


def test_server_certificate_names_every_host(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    srv = pki.issue_server(tmp_path, ["127.0.0.1", "Broker.Local", "::1", "broker.local"])
    san = _load(srv.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    with pytest.raises(pki.PkiError, match="neither an IP address nor a DNS name"):
        pki.issue_server(tmp_path, ["mqtts://broker:8883"])


@pytest.mark.parametrize("bad", ["Robot-1", "robot 1", "../robot", "", "-robot", "a" * 65])
def test_invalid_device_ids_are_refused(tmp_path: Path, bad: str) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(pki.PkiError, match="invalid device id"):
        pki.issue_device(tmp_path, bad)
    assert not (tmp_path / "devices").exists()


def test_a_device_cannot_take_a_controllers_name_nor_the_reverse(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue_controller(tmp_path, "ops")
    with pytest.raises(pki.PkiError, match="already issued to a controller"):
        pki.issue_device(tmp_path, "ops")
    pki.issue_device(tmp_path, "robot-1")
    with pytest.raises(pki.PkiError, match="already issued to a device"):
        pki.issue_controller(tmp_path, "robot-1")
    # Renewing a device's own certificate is fine.
    first = pki.issue_device(tmp_path, "robot-1")
    again = pki.issue_device(tmp_path, "robot-1")
    assert first.serial != again.serial
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["robot-1"]["serial"] == f"{again.serial:x}"
    assert pki.role_of(tmp_path, "ops") is pki.Role.CONTROLLER


def test_init_refuses_to_replace_a_ca_unless_forced(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    dev = pki.issue_device(tmp_path, "robot-1")
    before = (tmp_path / pki.CA_KEY).read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.init_ca(tmp_path)
    assert (tmp_path / pki.CA_KEY).read_bytes() == before
    pki.init_ca(tmp_path, force=True)
    with pytest.raises(pki.PkiError, match="was not issued by the fleet CA"):
        pki.verify_issued(tmp_path, dev.cert)


def test_certificates_do_not_outlive_the_ca(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path, days=100)
    dev = pki.issue_device(tmp_path, "robot-1", days=825)
    assert dev.not_after == ca.not_after


def test_issuing_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="jetfleet pki init"):
        pki.issue_device(tmp_path / "nowhere", "robot-1")


def test_cli_init_issue_and_verify(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    r = runner.invoke(pki_app, ["init", str(d)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(pki_app, ["issue", "robot-7", "--pki", str(d), "--output", "json"])
    assert r.exit_code == 0, r.output
    issued = json.loads(r.stdout)
    assert issued["common_name"] == "robot-7" and issued["role"] == "device"
    assert _mode(Path(issued["key"])) == 0o600
    r = runner.invoke(pki_app, ["issue-controller", "--pki", str(d), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0 and (tmp_path / "c" / "controller.key").is_file()
    r = runner.invoke(pki_app, ["issue-server", "--pki", str(d), "--host", "127.0.0.1",
                                "--host", "localhost"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert runner.invoke(pki_app, ["verify", issued["cert"], "--pki", str(d)]).exit_code == 0

    bad = runner.invoke(pki_app, ["issue", "Robot_7", "--pki", str(d)])
    assert bad.exit_code == 2 and "invalid device id 'Robot_7'" in bad.output
    clash = runner.invoke(pki_app, ["issue", "controller", "--pki", str(d)])
    assert clash.exit_code == 2 and "already issued to a controller" in clash.output

    other = tmp_path / "other"
    pki.init_ca(other)
    stranger = pki.issue_device(other, "robot-7")
    r = runner.invoke(pki_app, ["verify", str(stranger.cert), "--pki", str(d)])
    assert r.exit_code == 3 and "not issued by the fleet CA" in r.output


def test_cli_verify_reports_an_expired_certificate(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    ca = pki.load_ca(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    old = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "robot-old")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=10))
        .not_valid_after(now - timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    path = tmp_path / "old.crt"
    path.write_bytes(old.public_bytes(Encoding.PEM))
    r = runner.invoke(pki_app, ["verify", str(path), "--pki", str(tmp_path)])
    assert r.exit_code == 3 and "is not valid now" in r.output
