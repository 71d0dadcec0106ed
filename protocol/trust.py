"""The trust root (docs/protocol.md): keys, roles with thresholds, versioned rotation, expiry.

A device is provisioned with one trust root file. Everything else it accepts, bundles
(release role), commands (operator role) and newer trust roots (root role), is checked
against the trust root it holds now.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.dsse import Envelope, sign, verify_threshold
from protocol.errors import (
    CommandRejected,
    MessageError,
    RollbackAttackError,
    TrustExpiredError,
    TrustRootError,
    VerificationError,
)
from protocol.keys import PublicKey, SigningKey
from protocol.messages import COMMAND_PAYLOAD_TYPE, Command
from protocol.schema import Document

TRUST_PAYLOAD_TYPE = "application/vnd.jetfleet.trust+json"
RoleName = Literal["root", "release", "operator"]
ROLES: tuple[RoleName, ...] = ("root", "release", "operator")


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    keytype: Literal["ed25519"] = "ed25519"
    public: str = Field(pattern=r"^[0-9a-f]{64}$", description="raw public key, hex")


class Role(BaseModel):
    model_config = ConfigDict(extra="ignore")
    keyids: list[str] = Field(min_length=1)
    threshold: int = Field(ge=1)

    @model_validator(mode="after")
    def _reachable(self) -> Role:
        if self.threshold > len(set(self.keyids)):
            raise MessageError(
                f"role threshold {self.threshold} exceeds its {len(set(self.keyids))} key(s)"
            )
        return self


class TrustRoot(Document):
    KIND: ClassVar[str] = "trust"

    version: int = Field(ge=1)
    expires: datetime
    keys: dict[str, KeyEntry]
    roles: dict[RoleName, Role]

    @field_validator("roles")
    @classmethod
    def _all_roles(cls, v: dict[str, Role]) -> dict[str, Role]:
        missing = [r for r in ROLES if r not in v]
        if missing:
            raise MessageError(f"trust root lacks role(s) {', '.join(missing)}")
        return v

    @model_validator(mode="after")
    def _keys_match(self) -> TrustRoot:
        for keyid, entry in self.keys.items():
            if PublicKey.from_hex(entry.public).keyid != keyid:
                raise MessageError(f"key id {keyid[:12]}… is not the SHA-256 of its public key")
        for name, role in self.roles.items():
            unknown = [k for k in role.keyids if k not in self.keys]
            if unknown:
                raise MessageError(f"role {name} names unknown key id {unknown[0][:12]}…")
        if self.expires.tzinfo is None:
            raise MessageError("trust root 'expires' must carry a timezone")
        return self

    def public_keys(self) -> dict[str, PublicKey]:
        return {k: PublicKey.from_hex(e.public) for k, e in self.keys.items()}

    def check_expiry(self, now: datetime) -> None:
        if now >= self.expires:
            raise TrustExpiredError(
                f"trust root version {self.version} expired at {self.expires.isoformat()}; "
                "install a newer trust root (jetfleet keys rotate) or check the device clock"
            )

    def verify(self, envelope: Envelope, role: RoleName, payload_type: str, now: datetime) -> bytes:
        """The payload, if a threshold of `role` keys signed it and this root is unexpired."""
        self.check_expiry(now)
        r = self.roles[role]
        return verify_threshold(
            envelope,
            payload_type=payload_type,
            all_keys=self.public_keys(),
            role_name=role,
            role_keyids=r.keyids,
            threshold=r.threshold,
        )


def _parse_root(envelope: Envelope) -> TrustRoot:
    try:
        return TrustRoot.decode(envelope.payload_bytes())
    except MessageError as e:
        raise TrustRootError(f"invalid trust root: {e.reason}") from e


def load_trust_root(data: bytes, now: datetime, *, check_expiry: bool = True) -> TrustRoot:
    """Parse a provisioned trust root: self-signed by a threshold of its root keys, unexpired.

    A device trusts the first file on its disk (it is installed by the operator); every
    later one must pass `rotate`. `check_expiry=False` is for the start of a rotation
    chain: as in TUF, only the newest root of the chain has to be unexpired.
    """
    try:
        envelope = Envelope.decode(data)
    except MessageError as e:
        raise TrustRootError(f"trust root file: {e.reason}") from e
    root = _parse_root(envelope)
    r = root.roles["root"]
    verify_threshold(
        envelope,
        payload_type=TRUST_PAYLOAD_TYPE,
        all_keys=root.public_keys(),
        role_name="root",
        role_keyids=r.keyids,
        threshold=r.threshold,
    )
    if check_expiry:
        root.check_expiry(now)
    return root


def rotate(
    current: TrustRoot,
    new_envelope: Envelope,
    now: datetime,
    *,
    check_expiry: bool = True,
    consecutive: bool = True,
) -> TrustRoot:
    """TUF's root rotation: signed by a threshold of the old root keys AND of the new root
    keys, exactly one version newer, and not already expired (`check_expiry=False` while
    walking a chain whose newest root is checked at the end). A device further behind
    walks the roots in between (`rotate_chain`). `consecutive=False` only replays roots
    this device accepted before the +1 rule (its own trust/ directory)."""
    new = _parse_root(new_envelope)
    if new.version <= current.version:
        raise RollbackAttackError(
            f"trust root version {new.version} is not newer than the trusted {current.version}"
        )
    old_role = current.roles["root"]
    try:
        verify_threshold(
            new_envelope,
            payload_type=TRUST_PAYLOAD_TYPE,
            all_keys=current.public_keys(),
            role_name="root",
            role_keyids=old_role.keyids,
            threshold=old_role.threshold,
        )
    except VerificationError as e:
        raise TrustRootError(f"new trust root is not signed by the current root keys: {e}") from e
    new_role = new.roles["root"]
    try:
        verify_threshold(
            new_envelope,
            payload_type=TRUST_PAYLOAD_TYPE,
            all_keys=new.public_keys(),
            role_name="root",
            role_keyids=new_role.keyids,
            threshold=new_role.threshold,
        )
    except VerificationError as e:
        raise TrustRootError(f"new trust root is not signed by its own root keys: {e}") from e
    if consecutive and new.version != current.version + 1:
        raise RollbackAttackError(
            f"trust root version {new.version} skips version(s) after the trusted "
            f"{current.version}: each root must be signed over by the one before it (send "
            "the roots in between as the chain; `jetfleet keys push` does)"
        )
    if check_expiry:
        new.check_expiry(now)
    return new


def rotate_chain(
    current: TrustRoot, envelopes: list[Envelope], now: datetime
) -> list[tuple[TrustRoot, Envelope]]:
    """Walk from `current` to the last of `envelopes` (oldest first), one `rotate` per
    version; roots at or below the current one are passed over (a chain serves devices at
    any earlier version). Only the newest must be unexpired, as in TUF. Returns each root
    accepted, in order (empty for no envelopes)."""
    steps: list[tuple[TrustRoot, Envelope]] = []
    root = current
    for i, envelope in enumerate(envelopes):
        last = i == len(envelopes) - 1
        if not last and _parse_root(envelope).version <= root.version:
            continue
        root = rotate(root, envelope, now, check_expiry=last)
        steps.append((root, envelope))
    return steps


def build_trust_root(
    *,
    root: list[SigningKey],
    release: list[SigningKey],
    operator: list[SigningKey],
    version: int = 1,
    expires: datetime | None = None,
    thresholds: dict[RoleName, int] | None = None,
    sign_with: list[SigningKey] | None = None,
) -> Envelope:
    """Make a signed trust root envelope. `sign_with` defaults to the new root keys; for a
    rotation pass the old root keys too."""
    limits: dict[str, int] = {str(k): v for k, v in (thresholds or {}).items()}
    expires = expires or datetime.now(timezone.utc) + timedelta(days=365)
    every = {k.keyid: k for k in [*root, *release, *operator]}
    doc = TrustRoot.new(
        version=version,
        expires=expires,
        keys={kid: KeyEntry(public=k.public.hex) for kid, k in every.items()},
        roles={
            name: Role(keyids=[k.keyid for k in keys], threshold=limits.get(name, 1))
            for name, keys in (("root", root), ("release", release), ("operator", operator))
        },
    )
    signers = sign_with if sign_with is not None else root
    return sign(doc.encode(), TRUST_PAYLOAD_TYPE, signers)


def sign_command(command: Command, operator_keys: list[SigningKey]) -> Envelope:
    return sign(command.encode(), COMMAND_PAYLOAD_TYPE, operator_keys)


def verify_command(
    data: bytes | Envelope,
    trust: TrustRoot,
    *,
    device_id: str,
    groups: list[str] | tuple[str, ...],
    now: datetime,
) -> Command:
    """Everything about a command that needs no memory: signature by the operator role,
    schema, expiry, and that it is addressed to this device or one of its groups.
    (Replay is the agent's job: it remembers command ids.)"""
    envelope = data if isinstance(data, Envelope) else Envelope.decode(data)
    payload = trust.verify(envelope, "operator", COMMAND_PAYLOAD_TYPE, now)
    command = Command.decode(payload)
    if now >= command.expires_at:
        raise CommandRejected(
            f"command {command.command_id} expired at {command.expires_at.isoformat()}",
            code="command_expired",
        )
    if command.issued_at > now + timedelta(minutes=5):
        raise CommandRejected(
            f"command {command.command_id} is issued in the future "
            f"({command.issued_at.isoformat()}); check the clocks",
            code="command_expired",
        )
    if command.target.startswith("group:"):
        if command.target[6:] not in groups:
            raise CommandRejected(
                f"command for {command.target}, this device is in {list(groups)}",
                code="wrong_target",
            )
    elif command.target != device_id:
        raise CommandRejected(
            f"command for device {command.target!r}, this is {device_id!r}", code="wrong_target"
        )
    return command
