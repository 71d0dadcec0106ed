"""The trust root (provisioning, TUF rotation, expiry) and operator-signed commands."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from protocol.dsse import Envelope, sign
from protocol.errors import (
    CommandRejected,
    MessageError,
    PayloadTypeError,
    RollbackAttackError,
    SchemaError,
    SignatureError,
    ThresholdError,
    TrustExpiredError,
    TrustRootError,
    UnsignedError,
    WrongRoleError,
)
from protocol.keys import SigningKey
from protocol.messages import COMMAND_PAYLOAD_TYPE, Command
from protocol.trust import (
    TRUST_PAYLOAD_TYPE,
    KeyEntry,
    Role,
    TrustRoot,
    build_trust_root,
    load_trust_root,
    rotate,
    rotate_chain,
    sign_command,
    verify_command,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
Fleet = tuple[TrustRoot, SigningKey, SigningKey]


def _keys(n: int = 3) -> list[SigningKey]:
    return [SigningKey.generate() for _ in range(n)]


def _root(
    root: list[SigningKey], version: int = 1, days: int = 30, **kw: Any
) -> tuple[Envelope, list[SigningKey], list[SigningKey]]:
    release, operator = _keys(1), _keys(1)
    env = build_trust_root(
        root=root,
        release=release,
        operator=operator,
        version=version,
        expires=NOW + timedelta(days=days),
        **kw,
    )
    return env, release, operator


# -- provisioning ------------------------------------------------------------------------


def test_provisioned_trust_root_must_be_self_signed_by_its_root_keys() -> None:
    root = _keys(1)
    env, _, _ = _root(root)
    assert load_trust_root(env.encode(), NOW).version == 1
    forged, _, _ = _root(root, sign_with=_keys(1))
    with pytest.raises(SignatureError):
        load_trust_root(forged.encode(), NOW)
    unsigned, _, _ = _root(root, sign_with=[])
    with pytest.raises(UnsignedError):
        load_trust_root(unsigned.encode(), NOW)


def test_trust_root_signed_by_its_release_key_is_wrong_role() -> None:
    root = _keys(1)
    release, operator = _keys(1), _keys(1)
    env = build_trust_root(
        root=root, release=release, operator=operator, expires=NOW + timedelta(days=1),
        sign_with=release,
    )  # fmt: skip
    with pytest.raises(WrongRoleError):
        load_trust_root(env.encode(), NOW)


def test_root_threshold_is_enforced() -> None:
    root = _keys(3)
    env, _, _ = _root(root, thresholds={"root": 2}, sign_with=root[:1])
    with pytest.raises(ThresholdError):
        load_trust_root(env.encode(), NOW)
    env, _, _ = _root(root, thresholds={"root": 2}, sign_with=root[:2])
    assert load_trust_root(env.encode(), NOW).roles["root"].threshold == 2


def test_expired_trust_root_is_refused_and_says_what_to_do() -> None:
    env, _, _ = _root(_keys(1), days=1)
    with pytest.raises(TrustExpiredError, match="keys rotate") as e:
        load_trust_root(env.encode(), NOW + timedelta(days=2))
    assert e.value.code == "trust_expired"


def test_garbage_trust_root_files_are_trust_root_errors() -> None:
    for raw in (b"", b"{}", b"[1]", b"\x00\x01", json.dumps({"payloadType": 1}).encode()):
        with pytest.raises(TrustRootError):
            load_trust_root(raw, NOW)


def test_trust_root_document_rules() -> None:
    k = SigningKey.generate()
    entry = KeyEntry(public=k.public.hex)
    with pytest.raises((MessageError, ValueError), match="threshold 2 exceeds"):
        Role(keyids=[k.keyid], threshold=2)
    good_roles = {r: {"keyids": [k.keyid], "threshold": 1} for r in ("root", "release", "operator")}
    base = {"version": 1, "expires": NOW + timedelta(days=1), "keys": {k.keyid: entry}}
    with pytest.raises(MessageError, match="lacks role"):
        TrustRoot.new(**base, roles={"root": good_roles["root"]})
    with pytest.raises(MessageError, match="not the SHA-256"):
        TrustRoot.new(**{**base, "keys": {"ab" * 32: entry}}, roles=good_roles)
    with pytest.raises(MessageError, match="timezone"):
        TrustRoot.new(**{**base, "expires": datetime(2030, 1, 1)}, roles=good_roles)


# -- rotation (TUF) ----------------------------------------------------------------------


def test_rotation_needs_the_old_and_the_new_root_keys() -> None:
    old_root, new_root = _keys(1), _keys(1)
    v1 = load_trust_root(_root(old_root)[0].encode(), NOW)
    both, _, _ = _root(new_root, version=2, sign_with=old_root + new_root)
    assert rotate(v1, both, NOW).version == 2
    only_new, _, _ = _root(new_root, version=2)
    with pytest.raises(TrustRootError, match="current root keys"):
        rotate(v1, only_new, NOW)
    only_old, _, _ = _root(new_root, version=2, sign_with=old_root)
    with pytest.raises(TrustRootError, match="its own root keys"):
        rotate(v1, only_old, NOW)


def test_rotation_to_the_same_or_a_lower_version_is_a_rollback_attack() -> None:
    root = _keys(1)
    v3 = load_trust_root(_root(root, version=3)[0].encode(), NOW)
    for version in (3, 2, 1):
        env, _, _ = _root(root, version=version)
        with pytest.raises(RollbackAttackError) as e:
            rotate(v3, env, NOW)
        assert e.value.code == "trust_version"


def test_rotation_that_skips_a_version_is_refused_even_with_both_signatures() -> None:
    old_root, new_root = _keys(1), _keys(1)
    v1 = load_trust_root(_root(old_root)[0].encode(), NOW)
    v5, _, _ = _root(new_root, version=5, sign_with=old_root + new_root)
    with pytest.raises(RollbackAttackError, match="skips version") as e:
        rotate(v1, v5, NOW)
    assert e.value.code == "trust_version"


def test_a_chain_is_walked_one_version_at_a_time_from_the_root_held() -> None:
    k1, k2, k3 = _keys(1), _keys(1), _keys(1)
    v1 = load_trust_root(_root(k1)[0].encode(), NOW)
    e2, _, _ = _root(k2, version=2, sign_with=k1 + k2)
    e3, _, _ = _root(k3, version=3, sign_with=k2 + k3)
    assert [r.version for r, _ in rotate_chain(v1, [e2, e3], NOW)] == [2, 3]
    v2 = rotate(v1, e2, NOW)
    assert [r.version for r, _ in rotate_chain(v2, [e2, e3], NOW)] == [3]  # e2 passed over
    with pytest.raises(TrustRootError, match="current root keys"):
        rotate_chain(v1, [e3], NOW)  # v2 is missing: v3 is not signed by v1's root key
    forged, _, _ = _root(k3, version=2, sign_with=k3)
    with pytest.raises(TrustRootError):
        rotate_chain(v1, [forged, e3], NOW)


def test_rotation_to_an_already_expired_root_is_refused() -> None:
    root = _keys(1)
    v1 = load_trust_root(_root(root)[0].encode(), NOW)
    stale = build_trust_root(
        root=root, release=_keys(1), operator=_keys(1), version=2,
        expires=NOW - timedelta(seconds=1),
    )  # fmt: skip
    with pytest.raises(TrustExpiredError):
        rotate(v1, stale, NOW)


def test_rotation_can_renew_an_expired_root() -> None:
    root = _keys(1)
    v1 = load_trust_root(_root(root, days=1)[0].encode(), NOW)
    later = NOW + timedelta(days=5)
    renewed = build_trust_root(
        root=root, release=_keys(1), operator=_keys(1), version=2,
        expires=later + timedelta(days=30),
    )  # fmt: skip
    assert rotate(v1, renewed, later).version == 2


def test_rotation_respects_the_old_root_threshold() -> None:
    old_root, new_root = _keys(2), _keys(1)
    v1 = load_trust_root(
        _root(old_root, thresholds={"root": 2}, sign_with=old_root)[0].encode(), NOW
    )
    env, _, _ = _root(new_root, version=2, sign_with=old_root[:1] + new_root)
    with pytest.raises(TrustRootError, match="current root keys"):
        rotate(v1, env, NOW)


# -- commands ----------------------------------------------------------------------------


@pytest.fixture
def fleet() -> Fleet:
    env, release, operator = _root(_keys(1), days=365)
    return load_trust_root(env.encode(), NOW), release[0], operator[0]


def _command(target: str = "robot-1", issued: datetime = NOW, ttl_s: int = 600) -> Command:
    return Command.new(
        command_id=str(uuid.uuid4()),
        issued_at=issued,
        expires_at=issued + timedelta(seconds=ttl_s),
        target=target,
        kind="ping",
        body={},
    )


def _verify(env: Envelope, trust: TrustRoot, now: datetime = NOW) -> Command:
    return verify_command(env.encode(), trust, device_id="robot-1", groups=["canary"], now=now)


def test_command_signed_by_the_operator_for_this_device_is_accepted(fleet: Fleet) -> None:
    trust, _, operator = fleet
    cmd = _command()
    assert _verify(sign_command(cmd, [operator]), trust).command_id == cmd.command_id


def test_command_for_a_group_of_this_device_is_accepted_other_groups_are_not(fleet: Fleet) -> None:
    trust, _, operator = fleet
    assert _verify(sign_command(_command("group:canary"), [operator]), trust)
    with pytest.raises(CommandRejected) as e:
        _verify(sign_command(_command("group:warehouse-b"), [operator]), trust)
    assert e.value.code == "wrong_target"


def test_command_for_another_device_is_rejected(fleet: Fleet) -> None:
    trust, _, operator = fleet
    with pytest.raises(CommandRejected, match="robot-2") as e:
        _verify(sign_command(_command("robot-2"), [operator]), trust)
    assert e.value.code == "wrong_target"


def test_expired_command_is_rejected(fleet: Fleet) -> None:
    trust, _, operator = fleet
    env = sign_command(_command(ttl_s=60), [operator])
    with pytest.raises(CommandRejected, match="expired") as e:
        _verify(env, trust, NOW + timedelta(seconds=61))
    assert e.value.code == "command_expired"


def test_command_issued_in_the_future_is_rejected(fleet: Fleet) -> None:
    trust, _, operator = fleet
    env = sign_command(_command(issued=NOW + timedelta(hours=1)), [operator])
    with pytest.raises(CommandRejected, match="future"):
        _verify(env, trust)
    # Small clock skew is tolerated.
    assert _verify(sign_command(_command(issued=NOW + timedelta(minutes=2)), [operator]), trust)


def test_command_signed_by_the_release_key_is_wrong_role(fleet: Fleet) -> None:
    trust, release, _ = fleet
    with pytest.raises(WrongRoleError):
        _verify(sign_command(_command(), [release]), trust)


def test_command_signed_as_a_trust_root_payload_is_rejected(fleet: Fleet) -> None:
    trust, _, operator = fleet
    env = sign(_command().encode(), TRUST_PAYLOAD_TYPE, [operator])
    with pytest.raises(PayloadTypeError):
        _verify(env, trust)


def test_command_with_another_major_schema_is_rejected_with_the_reason(fleet: Fleet) -> None:
    trust, _, operator = fleet
    doc = _command().to_dict()
    doc["schema"] = "jetfleet.command/v2"
    env = sign(json.dumps(doc).encode(), COMMAND_PAYLOAD_TYPE, [operator])
    with pytest.raises(SchemaError, match="major version 2"):
        _verify(env, trust)


def test_command_is_rejected_once_the_trust_root_expired(fleet: Fleet) -> None:
    trust, _, operator = fleet
    late = trust.expires + timedelta(seconds=1)
    env = sign_command(_command(issued=late), [operator])
    with pytest.raises(TrustExpiredError):
        _verify(env, trust, late)
