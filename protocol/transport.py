"""Broker URLs and TLS client contexts, shared by the agent and the controller.

Not network code: it turns configuration (a URL, three file paths) into what paho-mqtt
needs, with errors that name the file and the reason, the first thing an operator
needs when a certificate is wrong.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from protocol.errors import ProtocolError


class TransportConfigError(ProtocolError):
    code = "transport_config"


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
    if bool(cert) != bool(key):
        raise TransportConfigError("mutual TLS needs both a client certificate and its key")
    if cert:
        cert_path, key_path = _read(cert, "client certificate"), _read(key, "client key")
        try:
            ctx.load_cert_chain(certfile=str(cert_path), keyfile=str(key_path))
        except ssl.SSLError as e:
            raise TransportConfigError(
                f"client certificate {cert_path} / key {key_path} unusable ({e.reason}): "
                "check that the key matches the certificate and both are PEM"
            ) from e
    return ctx
