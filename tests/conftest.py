"""Fixtures shared by every test: a real Mosquitto broker and real signing keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from controller.localbroker import LocalMosquitto
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
