"""DSSE envelopes: PAE, signing, and every way a threshold check can fail."""

from __future__ import annotations

import base64
import json

import pytest

from protocol.dsse import (
    MAX_SIGNATURES,
    Envelope,
    add_signatures,
    pae,
    sign,
    valid_signers,
    verify_threshold,
)
from protocol.errors import (
    MessageError,
    PayloadTypeError,
    SignatureError,
    ThresholdError,
    UnsignedError,
    WrongRoleError,
)
from protocol.ids import keyid_of
from protocol.keys import PublicKey, SigningKey

PT = "application/vnd.jetfleet.test+json"


def test_pae_matches_the_dsse_specification_vector() -> None:
    # github.com/secure-systems-lab/dsse/blob/master/protocol.md, "Test Vectors"
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t/ü", b"\xff\x00") == b"DSSEv1 4 t/\xc3\xbc 2 \xff\x00"


def test_key_id_is_the_sha256_of_the_raw_public_key() -> None:
    k = SigningKey.generate()
    assert k.keyid == keyid_of(k.public.raw) and len(k.keyid) == 64
    assert PublicKey.from_hex(k.public.hex) == k.public
    assert SigningKey.from_pem(k.to_pem()).keyid == k.keyid


def test_malformed_public_keys_and_pems_raise_signature_errors() -> None:
    with pytest.raises(SignatureError, match="not hex"):
        PublicKey.from_hex("zz" * 32)
    with pytest.raises(SignatureError, match="32 bytes"):
        PublicKey.from_hex("ab" * 31)
    with pytest.raises(SignatureError, match="PEM"):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def _roles(*keys: SigningKey) -> dict[str, PublicKey]:
    return {k.keyid: k.public for k in keys}


def test_signed_envelope_round_trips_through_json_and_verifies() -> None:
    k = SigningKey.generate()
    env = Envelope.decode(sign(b'{"a":1}', PT, [k]).encode())
    payload = verify_threshold(
        env, payload_type=PT, all_keys=_roles(k), role_name="r", role_keyids=[k.keyid], threshold=1
    )
    assert payload == b'{"a":1}'
    assert json.loads(env.encode())["payloadType"] == PT


def test_unsigned_envelope_is_rejected() -> None:
    k = SigningKey.generate()
    with pytest.raises(UnsignedError):
        verify_threshold(
            sign(b"x", PT, []),
            payload_type=PT,
            all_keys=_roles(k),
            role_name="release",
            role_keyids=[k.keyid],
            threshold=1,
        )


def test_wrong_payload_type_is_rejected_even_when_signed() -> None:
    k = SigningKey.generate()
    with pytest.raises(PayloadTypeError):
        verify_threshold(
            sign(b"x", "application/other", [k]),
            payload_type=PT,
            all_keys=_roles(k),
            role_name="release",
            role_keyids=[k.keyid],
            threshold=1,
        )


def test_payload_type_is_bound_by_the_signature() -> None:
    k = SigningKey.generate()
    env = sign(b"x", "application/other", [k]).model_copy(update={"payload_type": PT})
    with pytest.raises(SignatureError):
        verify_threshold(
            env,
            payload_type=PT,
            all_keys=_roles(k),
            role_name="r",
            role_keyids=[k.keyid],
            threshold=1,
        )


def test_signature_by_another_roles_key_is_wrong_role() -> None:
    release, operator = SigningKey.generate(), SigningKey.generate()
    with pytest.raises(WrongRoleError, match="release"):
        verify_threshold(
            sign(b"x", PT, [operator]),
            payload_type=PT,
            all_keys=_roles(release, operator),
            role_name="release",
            role_keyids=[release.keyid],
            threshold=1,
        )


def test_signature_by_an_unknown_key_or_a_tampered_payload_is_a_signature_error() -> None:
    k = SigningKey.generate()
    with pytest.raises(SignatureError):
        verify_threshold(
            sign(b"x", PT, [SigningKey.generate()]),
            payload_type=PT,
            all_keys=_roles(k),
            role_name="release",
            role_keyids=[k.keyid],
            threshold=1,
        )
    env = sign(b"x", PT, [k])
    tampered = env.model_copy(update={"payload": base64.b64encode(b"y").decode()})
    with pytest.raises(SignatureError):
        verify_threshold(
            tampered,
            payload_type=PT,
            all_keys=_roles(k),
            role_name="r",
            role_keyids=[k.keyid],
            threshold=1,
        )


def test_threshold_counts_distinct_valid_keys() -> None:
    a, b, c = (SigningKey.generate() for _ in range(3))
    keys = _roles(a, b, c)
    ids = [a.keyid, b.keyid, c.keyid]
    one = sign(b"x", PT, [a])
    with pytest.raises(ThresholdError, match="1 valid release signature"):
        verify_threshold(
            one, payload_type=PT, all_keys=keys, role_name="release", role_keyids=ids, threshold=2
        )
    same_twice = add_signatures(one, [a])
    with pytest.raises(ThresholdError):
        verify_threshold(
            same_twice,
            payload_type=PT,
            all_keys=keys,
            role_name="release",
            role_keyids=ids,
            threshold=2,
        )
    two = add_signatures(one, [b])
    assert (
        verify_threshold(
            two, payload_type=PT, all_keys=keys, role_name="release", role_keyids=ids, threshold=2
        )
        == b"x"
    )


def test_a_signature_claiming_anothers_key_id_does_not_count() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    env = sign(b"x", PT, [b])
    forged = env.model_copy(
        update={"signatures": [env.signatures[0].model_copy(update={"keyid": a.keyid})]}
    )
    assert valid_signers(forged, _roles(a, b)) == set()


def test_too_many_signatures_are_refused_before_verifying() -> None:
    k = SigningKey.generate()
    env = sign(b"x", PT, [k] * (MAX_SIGNATURES + 1))
    with pytest.raises(SignatureError, match="cap"):
        valid_signers(env, _roles(k))


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[]", b'{"payload": "eA=="}', b"\xff\xfe", b'{"payloadType": 1, "payload": 2}'],
)
def test_malformed_envelopes_are_message_errors(raw: bytes) -> None:
    with pytest.raises(MessageError):
        Envelope.decode(raw)


def test_non_base64_payload_is_a_message_error() -> None:
    env = Envelope.decode(json.dumps({"payloadType": PT, "payload": "***", "signatures": []}))
    with pytest.raises(MessageError, match="base64"):
        env.payload_bytes()
