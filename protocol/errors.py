"""Every error the protocol package raises, each carrying a machine `code` and a sentence,
and `CodedError`, the one base of every coded error in jetfleet.

The agent turns these into REJECTED events (`code` + `reason`) and the CLI into exit 3,
so the message must say what failed in words an operator can act on.
"""

from __future__ import annotations


class CodedError(Exception):
    """An error with a `code` for machines (stable: scripts match on it; a ReasonCode value
    where it ends a job) and a `reason` for people (one sentence, also `str(err)`). Every
    coded error of the agent and the controller derives from it.

    `job_code` is the ReasonCode a job ends with when `code` is not one (a family's finer
    codes, like `invalid_id`, report as the family's code)."""

    code = "internal"
    job_code = "internal"

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if code is not None:
            self.code = code


class ProtocolError(CodedError):
    """Base of the protocol package's errors: a message, a signature, a trust root, a bundle."""

    code = "protocol_error"


class MessageError(ProtocolError):
    """A payload that is not a valid message (bad JSON, missing field, wrong type)."""

    code = "malformed"
    job_code = "malformed"


class SchemaError(MessageError):
    """Missing `schema`, another kind of document, or an unsupported major version."""

    code = "schema"


class InvalidIdError(MessageError):
    """A device id or group name outside `^[a-z0-9][a-z0-9._-]{0,63}$`."""

    code = "invalid_id"


class VerificationError(ProtocolError):
    """Base class of everything that makes a signed document or a bundle untrusted."""

    code = "verification_failed"
    job_code = "bad_signature"


class UnsignedError(VerificationError):
    code = "unsigned"


class SignatureError(VerificationError):
    """A signature that does not verify, or an unknown key id."""

    code = "bad_signature"


class WrongRoleError(VerificationError):
    """Valid signatures, but by keys that do not hold the role this document needs."""

    code = "wrong_role"


class ThresholdError(VerificationError):
    """Fewer valid signatures of the role than its threshold."""

    code = "threshold"


class PayloadTypeError(VerificationError):
    code = "payload_type"


class TrustRootError(VerificationError):
    """A trust root that is malformed or fails the rotation rule."""

    code = "trust_root"
    job_code = "trust_root"


class TrustExpiredError(TrustRootError):
    code = "trust_expired"


class RollbackAttackError(TrustRootError):
    """A trust root whose version is not higher than the one already trusted."""

    code = "trust_version"


class CommandRejected(VerificationError):
    """A correctly signed command this device must not act on (expired, other target)."""

    code = "command_rejected"


class BundleError(VerificationError):
    """A bundle whose archive, manifest or files do not match what was signed."""

    code = "bundle_invalid"


class BundleFormatError(BundleError):
    """Not a canonical jetfleet tar: corrupt or non-canonical header, truncation, trailing
    data, a first member other than the manifest, an unreadable manifest envelope."""


class UnsafeMemberError(BundleError):
    """A member that extraction must never create: traversal, absolute path, a symlink,
    hard link, device file, FIFO, directory or a tar extension header."""

    def __init__(self, reason: str, *, member: str, code: str | None = None) -> None:
        super().__init__(reason, code=code)
        self.member = member


class MemberMismatchError(BundleError):
    """Members that differ from the signed manifest: missing, extra, duplicated, resized,
    or with another SHA-256 (tampered)."""

    def __init__(self, reason: str, *, member: str, code: str | None = None) -> None:
        super().__init__(reason, code=code)
        self.member = member


class BundleTooLargeError(BundleError):
    """Bigger than the caller's cap (`max_size`), or a manifest that declares more."""

    code = "too_large"


class TransportConfigError(ProtocolError):
    """A broker URL or TLS file (CA, client certificate, key) that cannot be used."""

    code = "transport_config"


class IllegalTransitionError(CodedError):
    """A job state change that `protocol.messages.TRANSITIONS` does not allow: a bug in
    the agent, refused before anything is written. Not a ProtocolError, so that no handler
    of bad input mistakes it for a refusal of the command."""

    code = "internal"
