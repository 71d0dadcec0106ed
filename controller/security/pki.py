"""The fleet's TLS PKI: one CA, and a certificate per device, controller and broker.

Why ECDSA P-256 and not Ed25519: Mosquitto (OpenSSL), RabbitMQ (Erlang/OTP ssl), EMQX and
HiveMQ (Java) all accept P-256 with SHA-256 for both CA and leaf certificates; Ed25519 X.509
is still missing from several of them.

The broker identifies a client by its certificate's common name (Mosquitto's
`use_identity_as_username`), so a common name is an identity: the PKI keeps an index of
every name it issued and the role it was issued for, and refuses to give a device the
name of a controller (that would hand a robot the controller's ACL) or the other way round.

Layout of a PKI directory:

    ca.crt  ca.key (0600)           the fleet CA
    index.json                      common name -> role, serial, expiry (last issued)
    devices/<id>.crt  <id>.key      `issue_device` (default output directory)
    controllers/<name>.crt .key     `issue_controller`
    servers/<name>.crt .key         `issue_server` (the broker's certificate)

Private keys are created with mode 0600 by `os.open` (never chmod after the fact, which
would leave a window where the key is readable), written to a temporary file, fsynced and
renamed into place.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import CodedError, InvalidIdError
from protocol.fsio import write_atomic
from protocol.ids import validate_id

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
INDEX = "index.json"
CRL = "crl.pem"
CA_DAYS = 3650
LEAF_DAYS = 825  # the CA/Browser Forum's old ceiling; long enough for robots in the field
DEFAULT_CA_NAME = "jetfleet fleet CA"
DEFAULT_CONTROLLER = "controller"
DEFAULT_SERVER = "broker"
URI_PREFIX = "urn:jetfleet:"
# Clocks on robots drift and a freshly issued certificate must work at once everywhere.
BACKDATE = timedelta(minutes=5)


class PkiError(CodedError):
    """A PKI operation that cannot be done; the message says why and what to do."""

    code = "pki"


class Role(str, Enum):
    DEVICE = "device"
    CONTROLLER = "controller"
    SERVER = "server"


_ROLE_DIRS = {Role.DEVICE: "devices", Role.CONTROLLER: "controllers", Role.SERVER: "servers"}


@dataclass(frozen=True)
class IssuedCert:
    """What an issue_* call wrote: give `cert`, `key` and `ca` to the client's TLS config."""

    common_name: str
    role: Role
    cert: Path
    key: Path
    ca: Path
    serial: int
    not_after: datetime

    def as_dict(self) -> dict[str, str | int]:
        return {
            "common_name": self.common_name,
            "role": self.role.value,
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
        }


@dataclass(frozen=True)
class FleetCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, the file never readable by anyone but its owner."""
    write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Atomic write of a certificate or config file (mode 0644)."""
    write_atomic(path, data, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init_ca(
    pki_dir: Path, *, name: str = DEFAULT_CA_NAME, days: int = CA_DAYS, force: bool = False
) -> FleetCA:
    """Create the fleet CA in `pki_dir` (ca.crt, ca.key). Refuses to overwrite one unless
    `force`: replacing the CA locks every device out until it gets a new certificate."""
    pki_dir = Path(pki_dir)
    if days < 1:
        raise PkiError(f"CA validity must be at least 1 day, not {days}")
    if (pki_dir / CA_KEY).exists() and not force:
        raise PkiError(
            f"{pki_dir / CA_KEY} already exists: a new CA would invalidate every certificate "
            "it issued (use --force to replace it anyway)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jetfleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(pki_dir / CA_KEY, _key_pem(key))
    write_public(pki_dir / CA_CERT, _cert_pem(cert))
    if force:
        with contextlib.suppress(FileNotFoundError):
            (pki_dir / INDEX).unlink()
    ca = FleetCA(cert, key, pki_dir / CA_CERT)
    _write_crl(pki_dir, ca, {})
    return ca


def load_ca(pki_dir: Path) -> FleetCA:
    pki_dir = Path(pki_dir)
    cert_path, key_path = pki_dir / CA_CERT, pki_dir / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise PkiError(f"{p} does not exist: run `jetfleet pki init {pki_dir}` first")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as e:
        raise PkiError(f"{cert_path} is not a PEM certificate ({e})") from e
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{key_path} is not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path} is not an EC private key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise PkiError(f"{key_path} is not the key of {cert_path}")
    if cert.not_valid_after_utc <= _now():
        raise PkiError(
            f"the fleet CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
            "nothing it signs can be trusted; create a new PKI"
        )
    return FleetCA(cert, key, cert_path)


def read_index(pki_dir: Path) -> dict[str, dict[str, Any]]:
    path = Path(pki_dir) / INDEX
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PkiError(f"{path} is unreadable ({e}); restore it from a backup") from e
    if not isinstance(data, dict):
        raise PkiError(f"{path} is not a JSON object")
    return data


def role_of(pki_dir: Path, common_name: str) -> Role | None:
    """The role a common name was issued for, or None if this PKI never issued it."""
    entry = read_index(pki_dir).get(common_name)
    return Role(entry["role"]) if entry else None


def _record(pki_dir: Path, cn: str, role: Role, cert: x509.Certificate) -> None:
    index = read_index(pki_dir)
    serial = f"{cert.serial_number:x}"
    # Every serial ever issued to the name: revoking a stolen robot must revoke its old
    # certificates too, not only the latest.
    earlier = index.get(cn, {}).get("serials", [])
    index[cn] = {
        "role": role.value,
        "serial": serial,
        "serials": [*earlier, serial],
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    write_public(
        Path(pki_dir) / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    )


def _check_name(pki_dir: Path, cn: str, role: Role) -> None:
    existing = role_of(pki_dir, cn)
    if existing is not None and existing != role:
        raise PkiError(
            f"the name {cn!r} was already issued to a {existing.value}: the broker knows a "
            f"client only by this name, so a {role.value} may not share it"
        )


def _issue(
    pki_dir: Path,
    cn: str,
    role: Role,
    *,
    out_dir: Path | None,
    days: int,
    sans: list[x509.GeneralName],
) -> IssuedCert:
    pki_dir = Path(pki_dir)
    if days < 1:
        raise PkiError(f"certificate validity must be at least 1 day, not {days}")
    ca = load_ca(pki_dir)
    _check_name(pki_dir, cn, role)
    out = Path(out_dir) if out_dir else pki_dir / _ROLE_DIRS[role]
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    # A certificate cannot usefully outlive the CA that vouches for it.
    not_after = min(now + timedelta(days=days), ca.not_after)
    eku = (
        ExtendedKeyUsageOID.SERVER_AUTH if role is Role.SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jetfleet"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # clientAuth only for clients: OpenSSL then refuses a device certificate as a
        # broker's, and the broker's certificate as a client's.
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path, ca_copy = out / f"{cn}.crt", out / f"{cn}.key", out / CA_CERT
    write_private(key_path, _key_pem(key))
    write_public(cert_path, _cert_pem(cert))
    # The client needs the CA next to its own certificate to verify the broker.
    if ca_copy.resolve() != ca.cert_path.resolve():
        write_public(ca_copy, ca.cert_path.read_bytes())
    _record(pki_dir, cn, role, cert)
    return IssuedCert(cn, role, cert_path, key_path, ca_copy, cert.serial_number, not_after)


def _checked_name(name: str, what: str) -> str:
    try:
        return validate_id(name, what)
    except InvalidIdError as e:
        raise PkiError(str(e)) from e


def issue_device(
    pki_dir: Path, device_id: str, *, out_dir: Path | None = None, days: int = LEAF_DAYS
) -> IssuedCert:
    """A client certificate whose common name is the device id (the broker user name)."""
    cn = _checked_name(device_id, "device id")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{URI_PREFIX}device:{cn}")]
    return _issue(pki_dir, cn, Role.DEVICE, out_dir=out_dir, days=days, sans=sans)


def issue_controller(
    pki_dir: Path,
    name: str = DEFAULT_CONTROLLER,
    *,
    out_dir: Path | None = None,
    days: int = LEAF_DAYS,
) -> IssuedCert:
    """A client certificate for the controller (the broker ACL gives it the whole tree)."""
    cn = _checked_name(name, "controller name")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{URI_PREFIX}controller:{cn}")]
    return _issue(pki_dir, cn, Role.CONTROLLER, out_dir=out_dir, days=days, sans=sans)


def issue_server(
    pki_dir: Path,
    hosts: list[str],
    *,
    name: str = DEFAULT_SERVER,
    out_dir: Path | None = None,
    days: int = LEAF_DAYS,
) -> IssuedCert:
    """The broker's server certificate; `hosts` (DNS names or IP addresses) are what
    clients put in their broker URL, and hostname verification checks them."""
    cn = _checked_name(name, "server name")
    if not hosts:
        raise PkiError("a server certificate needs at least one --host (name or IP in the URL)")
    sans: list[x509.GeneralName] = []
    for h in hosts:
        general: x509.GeneralName
        try:
            general = x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            if not h or any(c.isspace() or c in "/:@" for c in h):
                raise PkiError(f"--host {h!r} is neither an IP address nor a DNS name") from None
            general = x509.DNSName(h.lower())  # DNS names compare case-insensitively
        if general not in sans:
            sans.append(general)
    return _issue(pki_dir, cn, Role.SERVER, out_dir=out_dir, days=days, sans=sans)


@dataclass(frozen=True)
class Revocation:
    common_name: str
    serials: list[int]
    crl: Path


def _read_crl(pki_dir: Path, ca: FleetCA) -> dict[int, datetime]:
    """Serial -> revocation date of the PKI's current CRL (empty when there is none)."""
    path = Path(pki_dir) / CRL
    if not path.is_file():
        return {}
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as e:
        raise PkiError(f"{path} is not a PEM CRL ({e}); restore it from a backup") from e
    if not crl.is_signature_valid(ca.key.public_key()):
        raise PkiError(f"{path} was not signed by the fleet CA {ca.cert_path}")
    return {r.serial_number: r.revocation_date_utc for r in crl}


def _write_crl(pki_dir: Path, ca: FleetCA, revoked: dict[int, datetime]) -> Path:
    path = Path(pki_dir) / CRL
    number = 1
    if path.is_file():
        with contextlib.suppress(ValueError, x509.ExtensionNotFound):
            old = x509.load_pem_x509_crl(path.read_bytes())
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    now = _now()
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - BACKDATE)
        # OpenSSL rejects every client once the CRL it checks against has expired: this
        # CA is offline and its CRL is regenerated by hand, so it lives as long as the CA.
        .next_update(ca.not_after)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    write_public(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def revoke(pki_dir: Path, common_name: str) -> Revocation:
    """Revoke every certificate this PKI issued to `common_name` (a stolen or retired
    robot) and rewrite crl.pem. Brokers enforce it once they load the new CRL (see
    `jetfleet broker config`, which ships it as `crlfile`)."""
    pki_dir = Path(pki_dir)
    ca = load_ca(pki_dir)
    entry = read_index(pki_dir).get(common_name)
    if not entry:
        raise PkiError(f"this PKI never issued a certificate to {common_name!r}")
    serials = [int(s, 16) for s in entry.get("serials", [entry["serial"]])]
    revoked = _read_crl(pki_dir, ca)
    now = _now()
    for s in serials:
        revoked.setdefault(s, now)
    return Revocation(common_name, serials, _write_crl(pki_dir, ca, revoked))


def revoked_serials(pki_dir: Path) -> set[int]:
    return set(_read_crl(pki_dir, load_ca(pki_dir)))


def server_cert_paths(pki_dir: Path, name: str = DEFAULT_SERVER) -> tuple[Path, Path]:
    """Where `issue_server` put the broker's certificate and key by default."""
    d = Path(pki_dir) / _ROLE_DIRS[Role.SERVER]
    return d / f"{name}.crt", d / f"{name}.key"


def verify_issued(pki_dir: Path, cert_path: Path) -> x509.Certificate:
    """Check that `cert_path` was signed by this PKI's CA and is valid now (for `pki show`
    and for the broker config, which refuses a server certificate from another CA)."""
    ca = load_ca(pki_dir)
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as e:
        raise PkiError(f"{cert_path} is not a readable PEM certificate ({e})") from e
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise PkiError(f"{cert_path} was not issued by the fleet CA {ca.cert_path}") from e
    if cert.serial_number in _read_crl(pki_dir, ca):
        raise PkiError(f"{cert_path} has been revoked (serial {cert.serial_number:x})")
    now = _now()
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise PkiError(
            f"{cert_path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d})"
        )
    return cert


def copy_public(src: Path, dest: Path) -> None:
    write_public(dest, Path(src).read_bytes())


def copy_private(src: Path, dest: Path) -> None:
    write_private(dest, Path(src).read_bytes())


__all__ = [
    "CA_CERT",
    "CA_KEY",
    "FleetCA",
    "IssuedCert",
    "PkiError",
    "Role",
    "copy_private",
    "copy_public",
    "init_ca",
    "issue_controller",
    "issue_device",
    "issue_server",
    "load_ca",
    "read_index",
    "revoke",
    "revoked_serials",
    "role_of",
    "server_cert_paths",
    "verify_issued",
    "write_private",
    "write_public",
]
