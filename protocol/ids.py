"""Identifiers: device ids, group names, key ids, semantic versions."""

from __future__ import annotations

import hashlib
import re
from functools import total_ordering

from protocol.errors import InvalidIdError, MessageError

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_ID_RE = re.compile(ID_PATTERN)
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def validate_id(value: str, what: str = "device id") -> str:
    """Return `value` if it is a valid device id / group name, else raise InvalidIdError."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise InvalidIdError(f"invalid {what} {value!r}: must match {ID_PATTERN}")
    return value


def keyid_of(public_raw: bytes) -> str:
    """A key id is the lowercase hex SHA-256 of the raw 32-byte public key (docs/protocol.md)."""
    return hashlib.sha256(public_raw).hexdigest()


@total_ordering
class SemVer:
    """A semantic version (semver.org 2.0) with its precedence rules."""

    __slots__ = ("build", "major", "minor", "patch", "prerelease", "text")

    def __init__(self, text: str) -> None:
        m = _SEMVER_RE.match(text) if isinstance(text, str) else None
        if not m:
            raise MessageError(f"invalid version {text!r}: expected semantic version like 1.2.3")
        self.text = text
        self.major, self.minor, self.patch = int(m[1]), int(m[2]), int(m[3])
        self.prerelease = tuple(m[4].split(".")) if m[4] else ()
        self.build = m[5] or ""

    def _key(self) -> tuple[object, ...]:
        # A release sorts after its pre-releases; numeric identifiers sort before alphanumeric.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 1 if not pre else 0, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SemVer) and self._key() == other._key()

    def __lt__(self, other: SemVer) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"SemVer({self.text!r})"


def validate_semver(value: str) -> str:
    SemVer(value)
    return value
