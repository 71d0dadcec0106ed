"""The agent's trust store: the provisioned root plus the rotations it accepted since."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.truststore import TrustStore
from protocol.errors import TrustExpiredError
from protocol.keys import SigningKey
from protocol.trust import build_trust_root

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def _keys() -> tuple[SigningKey, SigningKey, SigningKey]:
    return SigningKey.generate(), SigningKey.generate(), SigningKey.generate()


def test_agent_starts_on_a_valid_rotated_root_after_the_provisioned_one_expired(
    tmp_path: Path,
) -> None:
    root1, release, operator = _keys()
    root2 = SigningKey.generate()
    provisioned = tmp_path / "trust.json"
    v1 = build_trust_root(
        root=[root1], release=[release], operator=[operator], expires=NOW + timedelta(days=10)
    )
    provisioned.write_bytes(v1.encode())
    store = TrustStore(provisioned, tmp_path / "data", NOW)
    v2 = build_trust_root(
        root=[root2],
        release=[release],
        operator=[operator],
        version=2,
        expires=NOW + timedelta(days=400),
        sign_with=[root1, root2],
    )
    store.update(v2, NOW)

    later = NOW + timedelta(days=30)  # v1 has expired, v2 has not
    reopened = TrustStore(provisioned, tmp_path / "data", later)

    assert reopened.root.version == 2
    reopened.root.check_expiry(later)  # does not raise


def test_an_expired_newest_root_loads_but_verifies_nothing(tmp_path: Path) -> None:
    root, release, operator = _keys()
    provisioned = tmp_path / "trust.json"
    env = build_trust_root(
        root=[root], release=[release], operator=[operator], expires=NOW + timedelta(days=1)
    )
    provisioned.write_bytes(env.encode())

    later = NOW + timedelta(days=2)
    store = TrustStore(provisioned, tmp_path / "data", later)

    with pytest.raises(TrustExpiredError, match="expired"):
        store.root.verify(env, "root", env.payload_type, later)
