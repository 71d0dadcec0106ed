"""Build and sign the commands the controller sends (docs/protocol.md) with the operator key.

Every command the rollout engine sends is addressed to one device id (never a group), so
each device's job has its own command id that the controller can record before it
publishes and match against the device's events afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from protocol.keys import SigningKey
from protocol.messages import (
    ActivateBody,
    CancelBody,
    Command,
    CommandKind,
    DeployBody,
    RollbackBody,
    TrustUpdateBody,
    WindowsBody,
    utcnow,
)
from protocol.trust import sign_command

# Long enough for a device that is offline for a working day to get its command from the
# broker's persistent session, short enough that a forgotten command does not fire next week.
DEFAULT_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class SignedCommand:
    command_id: str
    target: str
    kind: str
    envelope: bytes  # the DSSE envelope exactly as published (re-publishing it is idempotent)
    expires_at: datetime


class CommandSigner:
    """Signs commands with the operator key(s); one fresh command id per call."""

    def __init__(self, operator_keys: Sequence[SigningKey], ttl: timedelta = DEFAULT_TTL) -> None:
        if not operator_keys:
            raise ValueError("signing commands needs at least one operator key")
        if ttl <= timedelta(0):
            raise ValueError("command TTL must be positive")
        self._keys = list(operator_keys)
        self.ttl = ttl

    @property
    def operator_keys(self) -> list[SigningKey]:
        """The keys it signs with (releases are signed by the same operator role)."""
        return list(self._keys)

    def sign(self, command: Command) -> SignedCommand:
        envelope = sign_command(command, self._keys).encode()
        return SignedCommand(
            command.command_id, command.target, command.kind.value, envelope, command.expires_at
        )

    def _command(
        self, target: str, kind: CommandKind, body: object, now: datetime | None
    ) -> Command:
        issued = now or utcnow()
        return Command.new(
            command_id=str(uuid.uuid4()),
            issued_at=issued,
            expires_at=issued + self.ttl,
            target=target,
            kind=kind,
            body=body,
        )

    def deploy(
        self,
        device_id: str,
        *,
        url: str,
        sha256: str,
        size: int,
        rollout_id: str,
        name: str,
        version: str,
        stage: bool = False,
        now: datetime | None = None,
    ) -> SignedCommand:
        """`stage`: the device stops STAGED after its gate, until an `activate`."""
        body = DeployBody(
            url=url,
            sha256=sha256,
            size=size,
            rollout_id=rollout_id,
            name=name,
            version=version,
            stage=stage,
        )
        return self.sign(self._command(device_id, CommandKind.DEPLOY, body, now))

    def activate(
        self, device_id: str, *, command_id: str, now: datetime | None = None
    ) -> SignedCommand:
        """Switch the device's STAGED deploy `command_id` (it then reports under that id)."""
        body = ActivateBody(command_id=command_id)
        return self.sign(self._command(device_id, CommandKind.ACTIVATE, body, now))

    def rollback(
        self,
        device_id: str,
        *,
        model: str,
        to_version: str,
        rollout_id: str,
        now: datetime | None = None,
    ) -> SignedCommand:
        body = RollbackBody(model=model, to_version=to_version, rollout_id=rollout_id)
        return self.sign(self._command(device_id, CommandKind.ROLLBACK, body, now))

    def cancel(
        self, device_id: str, *, command_id: str, now: datetime | None = None
    ) -> SignedCommand:
        """Ask a device to stop the job of `command_id` (before it starts activating)."""
        body = CancelBody(command_id=command_id)
        return self.sign(self._command(device_id, CommandKind.CANCEL, body, now))

    def windows(
        self,
        target: str,
        *,
        windows: list[str],
        timezone: str = "",
        clear: bool = False,
        now: datetime | None = None,
    ) -> SignedCommand:
        """Set the maintenance windows of a device or `group:NAME` (they replace agent.toml's
        until a `clear`; the device checks the specs and refuses bad ones, bad_windows)."""
        body = WindowsBody(windows=windows, timezone=timezone, clear=clear)
        return self.sign(self._command(target, CommandKind.WINDOWS, body, now))

    def ping(self, target: str, now: datetime | None = None) -> SignedCommand:
        return self.sign(self._command(target, CommandKind.PING, {}, now))

    def trust_update(
        self,
        device_id: str,
        *,
        trust_root: dict[str, Any],
        chain: list[dict[str, Any]] | None = None,
        now: datetime | None = None,
    ) -> SignedCommand:
        """Hand a device a new trust root (the DSSE envelope of `keys rotate`'s trust.json),
        with `chain`, the roots before it (oldest first); the device accepts it only under
        TUF's rotation rule, one version at a time (protocol.trust.rotate_chain)."""
        body = TrustUpdateBody(trust_root=trust_root, chain=chain or [])
        return self.sign(self._command(device_id, CommandKind.TRUST_UPDATE, body, now))
