"""Desired state (issue 13): a group's release and a device's pins, operator-signed.

A release says which version of each model a group's robots run; a pin document overrides
it for one device, model by model. Both are DSSE envelopes signed by the operator role
(like commands) and published retained, so a robot learns them on connect with no
controller running. Each carries a per-target monotonic `version`: the agent keeps the
highest it accepted and refuses anything older (or as old with other content), so an
untrusted broker can withhold documents (delaying convergence) but never turn a robot back.

No expiry: robots may be offline for weeks and must still converge to the last release on
their return. Freshness comes from the monotonic version, a stolen operator key is retired
by a trust rotation (documents it signs afterwards are refused), and the trust root's own
expiry still bounds everything the device accepts (docs/security.md).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.dsse import Envelope, sign
from protocol.errors import CommandRejected, MessageError
from protocol.ids import validate_id, validate_semver
from protocol.keys import SigningKey
from protocol.schema import Document
from protocol.trust import TrustRoot

RELEASE_PAYLOAD_TYPE = "application/vnd.jetfleet.release+json"
PINS_PAYLOAD_TYPE = "application/vnd.jetfleet.pins+json"
MAX_MODELS = 64
FUTURE_SKEW = timedelta(minutes=5)


class DesiredModel(BaseModel):
    """One model's desired version and where to fetch its bundle."""

    model_config = ConfigDict(extra="ignore")

    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    url: str = Field(min_length=1, description="http(s):// or file:// of the .jfb bundle")
    size: int = Field(gt=0, description="bundle size in bytes: a hard cap on the download")

    _v = field_validator("version")(lambda cls, v: validate_semver(v))


def _model_names(v: dict[str, DesiredModel]) -> dict[str, DesiredModel]:
    if len(v) > MAX_MODELS:
        raise MessageError(f"{len(v)} models, at most {MAX_MODELS}")
    for name in v:
        validate_id(name, "model name")
    return v


def _aware(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise MessageError("issued_at must carry a timezone (RFC 3339 with Z or an offset)")
    return v


class Release(Document):
    """A group's desired state; retained on the group's release topic, operator-signed."""

    KIND: ClassVar[str] = "release"

    group: str
    version: int = Field(ge=1, description="per group, strictly increasing")
    issued_at: datetime
    models: dict[str, DesiredModel] = Field(description="model name -> what the group runs")
    retry: bool = Field(
        default=False,
        description="an explicit retry: versions held back on a device after failing there "
        "are tried once more when it accepts this document",
    )

    _g = field_validator("group")(lambda cls, v: validate_id(v, "group name"))
    _m = field_validator("models")(lambda cls, v: _model_names(v))
    _t = field_validator("issued_at")(lambda cls, v: _aware(v))


class Pins(Document):
    """One device's pins: for each model named, this version instead of its groups'."""

    KIND: ClassVar[str] = "pins"

    device: str
    version: int = Field(ge=1, description="per device, strictly increasing")
    issued_at: datetime
    models: dict[str, DesiredModel] = Field(
        default_factory=dict, description="model name -> pinned version (empty: no pins)"
    )

    _d = field_validator("device")(lambda cls, v: validate_id(v))
    _m = field_validator("models")(lambda cls, v: _model_names(v))
    _t = field_validator("issued_at")(lambda cls, v: _aware(v))


def sign_release(doc: Release | Pins, operator_keys: list[SigningKey]) -> Envelope:
    kind = RELEASE_PAYLOAD_TYPE if isinstance(doc, Release) else PINS_PAYLOAD_TYPE
    return sign(doc.encode(), kind, operator_keys)


def _not_future(issued_at: datetime, now: datetime, what: str) -> None:
    if issued_at > now + FUTURE_SKEW:
        raise CommandRejected(
            f"{what} is issued in the future ({issued_at.isoformat()}); check the clocks",
            code="command_expired",
        )


def verify_release(envelope: Envelope, trust: TrustRoot, *, group: str, now: datetime) -> Release:
    """A release signed by the operator role, for `group` (the topic it came on)."""
    doc = Release.decode(trust.verify(envelope, "operator", RELEASE_PAYLOAD_TYPE, now))
    if doc.group != group:
        raise CommandRejected(
            f"release for group {doc.group!r} arrived on group {group!r}'s topic",
            code="wrong_target",
        )
    _not_future(doc.issued_at, now, f"release {doc.version} of group {group}")
    return doc


def verify_pins(envelope: Envelope, trust: TrustRoot, *, device_id: str, now: datetime) -> Pins:
    """A pin document signed by the operator role, for this very device."""
    doc = Pins.decode(trust.verify(envelope, "operator", PINS_PAYLOAD_TYPE, now))
    if doc.device != device_id:
        raise CommandRejected(
            f"pins for device {doc.device!r}, this is {device_id!r}", code="wrong_target"
        )
    _not_future(doc.issued_at, now, f"pins {doc.version} of {device_id}")
    return doc
