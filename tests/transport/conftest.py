"""Fixtures: a fleet PKI (session), a Mosquitto with the generated mutual-TLS config and
ACL (per test), and `probe(identity)` clients connected with an identity's certificate."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.transport.brokers import FleetPki, Probe, TlsBroker, make_fleet_pki, start_tls_broker


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    return make_fleet_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(tmp_path: Path, fleet_pki: FleetPki) -> Iterator[TlsBroker]:
    broker = start_tls_broker(tmp_path / "broker", fleet_pki)
    yield broker
    broker.stop()


@pytest.fixture
def probe(tls_broker: TlsBroker, fleet_pki: FleetPki) -> Iterator[Callable[..., Probe]]:
    """`probe("robot-a")` → a connected Probe with that identity's certificate."""
    made: list[Probe] = []

    def make(name: str, **kw: object) -> Probe:
        p = Probe(tls_broker.host, tls_broker.port, fleet_pki.tls(name), **kw)  # type: ignore[arg-type]
        assert p.connect(), f"{name} could not connect:\n{tls_broker.log[-1500:]}"
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
