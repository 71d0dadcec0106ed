"""Broker URLs, TLS client contexts and paho clients, shared by the agent and the controller.

Not network code: it turns configuration (a URL, three file paths) into what paho-mqtt
needs, with errors that name the file and the reason, the first thing an operator
needs when a certificate is wrong. `paho_client` is the one place a paho client is
made, so every side follows one TLS rule: the URL's scheme decides.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from protocol.errors import TransportConfigError  # importable from here too


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host[:1883]` or `mqtts://host[:8883]` (also tcp:// and ssl://)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise TransportConfigError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
    tls = scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise TransportConfigError(f"broker url {url!r} has no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as e:
        raise TransportConfigError(f"broker url {url!r}: bad port") from e
    return BrokerAddress(parts.hostname, port, tls)


def parse_broker_urls(text: str) -> list[BrokerAddress]:
    """One broker URL, or the nodes of one broker cluster as a comma-separated list
    (`mqtts://node1:8883,mqtts://node2:8883`), in the order a client tries them. One TLS
    setting covers them all, so the schemes must agree."""
    addrs = [parse_broker_url(u.strip()) for u in text.split(",") if u.strip()]
    if not addrs:
        raise TransportConfigError("broker url is empty")
    if len({a.tls for a in addrs}) > 1:
        raise TransportConfigError(
            f"broker urls {text!r} mix mqtt:// and mqtts://: list nodes of one kind"
        )
    return addrs


class BrokerList:
    """Which node of a broker cluster a client connects to next (pure state, no I/O).

    The first node at start and again after an established connection is lost (it may be
    back); after each failed attempt the next node, round the list. Every node must
    accept every client and share its sessions, which is what a cluster does and a
    second, independent broker does not.

    paho reconnects to the host it was last given, so the clients (agent/mqtt.py,
    controller/mqtt.py, controller/telemetry/ingest.py) call `move_on()` from their
    disconnect and connect-failure paths and, when it names a new node, `connect_async` to
    it: paho's next attempt then goes there (tests/transport/test_broker_failover.py holds
    paho 2.x to that)."""

    def __init__(self, addresses: list[BrokerAddress]) -> None:
        if not addresses:
            raise ValueError("a broker list needs at least one address")
        self.addresses = tuple(addresses)
        self._index = 0
        self._established = False

    @property
    def current(self) -> BrokerAddress:
        return self.addresses[self._index]

    def established(self) -> None:
        """The attempt on the current node got its CONNACK."""
        self._established = True

    def failed(self) -> BrokerAddress:
        """The connection or the attempt ended: the node to try next."""
        if self._established:
            self._index = 0
        else:
            self._index = (self._index + 1) % len(self.addresses)
        self._established = False
        return self.current

    def move_on(self) -> BrokerAddress | None:
        """`failed()`, returning the next node only when it is not the node just tried:
        the client must then be pointed at it (paho retries the host it was given)."""
        before = self.current
        after = self.failed()
        return None if after == before else after


def connect_first(client: paho.Client, brokers: BrokerList, **connect_args: Any) -> None:
    """Open `client`'s socket to the first node of `brokers` that takes it, in the list's
    order; the last node's error when none does."""
    error: OSError | ValueError | None = None
    for _ in brokers.addresses:
        node = brokers.current
        try:
            client.connect(node.host, node.port, **connect_args)
            return
        except (OSError, ValueError) as e:
            error = e
            brokers.failed()
    assert error is not None
    raise error


def _read(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TransportConfigError(f"{what} file {p} does not exist")
    try:
        p.open("rb").close()
    except OSError as e:
        raise TransportConfigError(f"{what} file {p} cannot be read: {e.strerror}") from e
    return p


def client_tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A TLS 1.2+ client context verifying the broker against `ca` (system CAs when empty),
    presenting `cert`/`key` for mutual TLS when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ca_path = _read(ca, "CA certificate")
        try:
            ctx.load_verify_locations(cafile=str(ca_path))
        except ssl.SSLError as e:
            raise TransportConfigError(
                f"CA certificate file {ca_path} is not a PEM certificate ({e.reason})"
            ) from e
        _check_ca_file(ca_path)
    if bool(cert) != bool(key):
        raise TransportConfigError("mutual TLS needs both a client certificate and its key")
    if cert:
        cert_path, key_path = _read(cert, "client certificate"), _read(key, "client key")
        check_certificate_dates(cert_path, "client certificate")
        try:
            ctx.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
        except ssl.SSLError as e:
            raise TransportConfigError(
                f"client certificate {cert_path} / key {key_path} unusable ({e.reason}): "
                "check that the key matches the certificate and both are PEM"
            ) from e
    return ctx


def paho_client(
    url: str,
    *,
    client_id: str,
    protocol: str = "5",
    persistent: bool = False,
    ca: str = "",
    cert: str = "",
    key: str = "",
    username: str = "",
    password: str = "",
    manual_ack: bool = False,
) -> tuple[paho.Client, BrokerAddress]:
    """A paho 2.x client (callback API 2) for `url`, and the address to connect to.

    The one TLS rule: TLS exactly when the URL says mqtts:// (or ssl://), verified
    against `ca` with `cert`/`key` for mutual TLS; with a plain URL the TLS files are not
    used (a config may keep them while a broker moves). `persistent` keeps an MQTT 3.1.1
    session (MQTT 5 sets it at connect time). A list of URLs (a cluster's nodes) gives
    the first node's address; `BrokerList` moves between them."""
    addr = parse_broker_urls(url)[0]
    v5 = protocol == "5"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    if username:
        client.username_pw_set(username, password or None)
    if addr.tls:
        client.tls_set_context(client_tls_context(ca, cert, key))
    return client, addr


# -- certificate checks and TLS failure explanations (additive, transport security) -------


def _load_pem_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        return []


def check_certificate_dates(path: Path, what: str, now: datetime | None = None) -> None:
    """Raise TransportConfigError naming `path` when its (first) certificate is expired or
    not yet valid: far clearer at start-up than a failed handshake later. A not-yet-valid
    certificate on a robot usually means its clock is wrong (no RTC battery, no NTP yet)."""
    certs = _load_pem_certs(path)
    if not certs:
        raise TransportConfigError(f"{what} file {path} holds no PEM certificate")
    c = certs[0]
    now = now or datetime.now(timezone.utc)
    if now > c.not_valid_after_utc:
        raise TransportConfigError(
            f"{what} {path} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
            "issue a new one (jetfleet pki issue)"
        )
    if now < c.not_valid_before_utc:
        raise TransportConfigError(
            f"{what} {path} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            f"and this machine's clock says {now:%Y-%m-%d %H:%M}: check the clock (NTP)"
        )


def _check_ca_file(path: Path) -> None:
    for c in _load_pem_certs(path):
        try:
            if c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                return
        except x509.ExtensionNotFound:
            continue
    raise TransportConfigError(
        f"CA certificate file {path} holds no CA certificate (is it a device's or the "
        "broker's own certificate? use the fleet CA, ca.crt)"
    )


# OpenSSL X509_V_ERR_* codes Python reports in SSLCertVerificationError.verify_code.
_X509_EXPIRED, _X509_NOT_YET_VALID = 10, 9
_X509_UNTRUSTED = {2, 18, 19, 20, 21}  # issuer unknown, self-signed, chain incomplete
_X509_NAME_MISMATCH, _X509_BAD_PURPOSE = {62, 64}, 26  # host name / IP address

# Alerts the broker sends when it refuses our client certificate (OpenSSL reason names).
_CLIENT_CERT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a client certificate and none was sent",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the handshake failed (no client certificate?)",
    "TLSV1_ALERT_UNKNOWN_CA": "it was not issued by a CA the broker trusts",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker finds it invalid",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "it is not a client certificate (clientAuth)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it has been revoked",
    "TLSV1_ALERT_DECRYPT_ERROR": "its key does not match it",
    "TLSV1_ALERT_ACCESS_DENIED": "access is denied",
}


def explain_ssl_error(
    err: BaseException, address: BrokerAddress, *, ca: str = "", cert: str = ""
) -> str:
    """One sentence for an operator, naming the file to fix, for a TLS failure talking to
    `address` (a handshake error from connect, or an alert read right after it)."""
    where = f"TLS with broker {address.host}:{address.port}"
    ca_name = f"the CA in {ca}" if ca else "the system's CA certificates"
    if isinstance(err, ssl.SSLCertVerificationError):
        code = err.verify_code
        if code in _X509_NAME_MISMATCH:
            return (
                f"{where}: the broker's certificate does not name {address.host!r}; connect "
                f"with a name it holds or reissue it (jetfleet pki issue-server --host "
                f"{address.host})"
            )
        if code in _X509_UNTRUSTED:
            return f"{where}: the broker's certificate is not signed by {ca_name}"
        if code == _X509_EXPIRED:
            return f"{where}: the broker's certificate has expired"
        if code == _X509_NOT_YET_VALID:
            return f"{where}: the broker's certificate is not valid yet: check this clock"
        if code == _X509_BAD_PURPOSE:
            return f"{where}: the broker's certificate is not a server certificate"
        return f"{where}: the broker's certificate is not trusted ({err.verify_message})"
    if isinstance(err, ssl.SSLError):
        reason = str(err.reason or "")
        if reason in _CLIENT_CERT_ALERTS:
            subject = f"client certificate {cert}" if cert else "this client (no certificate)"
            return f"{where}: the broker refused {subject}: {_CLIENT_CERT_ALERTS[reason]}"
        if reason == "WRONG_VERSION_NUMBER":
            return f"{where}: the broker does not speak TLS on this port (use mqtt://?)"
        return f"{where} failed: {err.reason or err}"
    if isinstance(err, TransportConfigError):
        return str(err)
    if isinstance(err, OSError):
        return f"cannot reach broker {address.host}:{address.port}: {err}"
    return f"{where} failed: {err}"


def diagnose_tls(
    address: BrokerAddress, ca: str = "", cert: str = "", key: str = "", timeout: float = 5.0
) -> str | None:
    """Open a TLS connection the way the MQTT client would and say what is wrong, or
    None when the broker accepts us. For use after a failed connect: under TLS 1.3 a
    broker refuses a client certificate only after the handshake, which an MQTT client
    reports as a bare "connection lost"; this reads the broker's alert instead."""
    try:
        ctx = client_tls_context(ca, cert, key)
    except TransportConfigError as e:
        return str(e)
    try:
        raw = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as e:
        return f"cannot reach broker {address.host}:{address.port}: {e}"
    try:
        with raw, ctx.wrap_socket(raw, server_hostname=address.host) as tls:
            tls.settimeout(min(timeout, 1.0))
            try:
                # An MQTT broker says nothing before CONNECT: silence means accepted.
                data = tls.recv(1)
            except TimeoutError:
                return None
            if data == b"":
                return (
                    f"TLS with broker {address.host}:{address.port}: the broker closed the "
                    f"connection after the handshake (client certificate {cert or 'none'} "
                    "refused? see the broker's log)"
                )
            return None
    except ssl.SSLError as e:
        return explain_ssl_error(e, address, ca=ca, cert=cert)
    except OSError as e:
        # A plain MQTT listener reads the ClientHello as a bad CONNECT and hangs up.
        return (
            f"TLS with broker {address.host}:{address.port}: the broker closed the connection "
            f"during the handshake ({e.strerror or e}): is this a plain mqtt:// port?"
        )
