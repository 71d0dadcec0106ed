"""Fixtures shared by every test: a real Mosquitto broker and real signing keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from controller.sandbox.localbroker import LocalMosquitto
from protocol.keys import SigningKey
from protocol.trust import TrustRoot, build_trust_root, load_trust_root


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[LocalMosquitto]:
    """A real Mosquitto on a free loopback port; `.stop()` / `.start()` keep the port."""
    broker = LocalMosquitto(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


@dataclass
class TrustMaterial:
    root: SigningKey
    release: SigningKey
    operator: SigningKey
    envelope_bytes: bytes
    trust: TrustRoot

    def write(self, path: Path) -> Path:
        path.write_bytes(self.envelope_bytes)
        return path


@pytest.fixture(scope="session")
def trust_material() -> TrustMaterial:
    """One key per role and the trust root they make (real Ed25519)."""
    root, release, operator = (SigningKey.generate() for _ in range(3))
    env = build_trust_root(root=[root], release=[release], operator=[operator])
    data = env.encode()
    return TrustMaterial(
        root, release, operator, data, load_trust_root(data, datetime.now(timezone.utc))
    )


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private RabbitMQ node with the MQTT plugin (MQTT 3.1.1 on Debian bookworm's 3.10):
    `.url` (plain) and `.tls_url` (mutual TLS with the fleet PKI in `.pki_dir`, made by
    controller.security.pki; issue client certificates from it). One node per session (it takes
    ~10 s to start): use unique device ids per test. Skips where RabbitMQ is not installed."""
    from controller.sandbox.localbroker import free_port
    from controller.security import pki
    from tests.transport.rabbit import LocalRabbitMQ, TlsListener, rabbitmq_missing

    why = rabbitmq_missing()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("rabbitmq")
    pki_dir = work / "pki"
    pki.init_ca(pki_dir)
    server = pki.issue_server(pki_dir, ["127.0.0.1", "localhost"])
    node = LocalRabbitMQ(
        work / "node", tls=TlsListener(free_port(), server.ca, server.cert, server.key)
    )
    node.pki_dir = pki_dir  # type: ignore[attr-defined]
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A private PostgreSQL server (tests/postgres.py), one per session, so one per xdist
    worker: ~2 s to initdb and start, less than queueing every PostgreSQL test on one
    worker would cost. Skips where the server binaries or psycopg are missing."""
    from tests.postgres import LocalPostgres, postgres_missing

    why = postgres_missing()
    if why:
        pytest.skip(why)
    server = LocalPostgres()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: Any) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The controller database, once per backend: a fresh SQLite file, then a fresh
    PostgreSQL database (a `--db`/JETFLEET_DB value either way)."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "controller.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """CLI commands configure structlog to write to the stderr of the moment; a later test's
    background thread would then log to a closed file. Each test starts from the defaults."""
    import structlog

    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "serial: load-sensitive (a speed verdict, a wall-clock bound): scripts/test runs it "
        "alone, after the parallel pass",
    )
    config.addinivalue_line(
        "markers",
        "postgresql: runs on a private PostgreSQL server (the `db` fixture's second backend; "
        "skips without the server binaries)",
    )


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The RabbitMQ node is per session, so per xdist worker, and takes ~10 s to start: the
    tests that use it share one worker, and so one node."""
    for item in items:
        if item.get_closest_marker("rabbitmq"):
            item.add_marker(pytest.mark.xdist_group("rabbitmq"))
