"""DSSE envelopes (github.com/secure-systems-lab/dsse): PAE, signing, threshold checks."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import (
    MessageError,
    PayloadTypeError,
    SignatureError,
    ThresholdError,
    UnsignedError,
    WrongRoleError,
)
from protocol.keys import PublicKey, SigningKey

MAX_SIGNATURES = 32  # a cap so a hostile envelope cannot make us verify without end


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: what is actually signed."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


class Signature(BaseModel):
    model_config = ConfigDict(extra="ignore")
    keyid: str = ""
    sig: str


class Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    payload_type: str = Field(alias="payloadType")
    payload: str  # base64 (standard alphabet)
    signatures: list[Signature] = Field(default_factory=list)

    @classmethod
    def decode(cls, data: bytes | str | Mapping[str, Any]) -> Envelope:
        try:
            if isinstance(data, (bytes, bytearray)):
                data = bytes(data).decode("utf-8")
            if isinstance(data, str):
                data = json.loads(data)
            if not isinstance(data, Mapping):
                raise MessageError("a DSSE envelope must be a JSON object")
            return cls.model_validate(dict(data))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise MessageError(f"not a DSSE envelope: {e}") from e
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise MessageError(f"not a DSSE envelope: {loc}: {first['msg']}") from e

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def payload_bytes(self) -> bytes:
        try:
            return base64.b64decode(self.payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MessageError("DSSE payload is not valid base64") from e


def sign(payload: bytes, payload_type: str, keys: Iterable[SigningKey]) -> Envelope:
    message = pae(payload_type, payload)
    return Envelope.model_validate(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode("ascii"),
            "signatures": [
                Signature(keyid=k.keyid, sig=base64.b64encode(k.sign(message)).decode("ascii"))
                for k in keys
            ],
        }
    )


def add_signatures(envelope: Envelope, keys: Iterable[SigningKey]) -> Envelope:
    message = pae(envelope.payload_type, envelope.payload_bytes())
    extra = [
        Signature(keyid=k.keyid, sig=base64.b64encode(k.sign(message)).decode("ascii"))
        for k in keys
    ]
    return envelope.model_copy(update={"signatures": [*envelope.signatures, *extra]})


def valid_signers(envelope: Envelope, keys: Mapping[str, PublicKey]) -> set[str]:
    """Key ids among `keys` with a valid signature on the envelope (each counted once)."""
    if len(envelope.signatures) > MAX_SIGNATURES:
        raise SignatureError(f"envelope has {len(envelope.signatures)} signatures, cap is 32")
    message = pae(envelope.payload_type, envelope.payload_bytes())
    good: set[str] = set()
    for s in envelope.signatures:
        key = keys.get(s.keyid)
        if key is None or s.keyid in good:
            continue
        try:
            raw = base64.b64decode(s.sig, validate=True)
        except (binascii.Error, ValueError):
            continue
        if key.verify(raw, message):
            good.add(s.keyid)
    return good


def verify_threshold(
    envelope: Envelope,
    *,
    payload_type: str,
    all_keys: Mapping[str, PublicKey],
    role_name: str,
    role_keyids: Iterable[str],
    threshold: int,
) -> bytes:
    """Return the payload if `threshold` distinct keys of the role signed it.

    Raises the most specific error: unsigned, wrong payload type, signatures that verify
    only with keys of other roles (wrong role), bad signatures, or too few of them.
    """
    if not envelope.signatures:
        raise UnsignedError(f"{role_name}-signed document has no signatures")
    if envelope.payload_type != payload_type:
        raise PayloadTypeError(f"payload type {envelope.payload_type!r}, expected {payload_type!r}")
    role_ids = set(role_keyids)
    role_keys = {k: v for k, v in all_keys.items() if k in role_ids}
    good = valid_signers(envelope, role_keys)
    if len(good) >= threshold:
        return envelope.payload_bytes()
    others = valid_signers(envelope, {k: v for k, v in all_keys.items() if k not in role_ids})
    if not good and others:
        raise WrongRoleError(
            f"signed by key(s) {', '.join(sorted(k[:12] for k in others))} which do not hold "
            f"the {role_name} role"
        )
    if not good:
        raise SignatureError(f"no valid signature by a {role_name} key")
    raise ThresholdError(
        f"{len(good)} valid {role_name} signature(s), the {role_name} role needs {threshold}"
    )
