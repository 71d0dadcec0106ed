"""The operator's key directory (`jetfleet keys init DIR`).

    DIR/root.key  DIR/release.key  DIR/operator.key   Ed25519, PEM PKCS8, mode 0600
    DIR/trust.json                                     the signed trust root (DSSE envelope)
    DIR/retired/v<N>/                                  keys replaced by `keys rotate`

Key files are written to a temporary name with O_EXCL and mode 0600 from the start (never
readable by others, not even for an instant), fsynced, then renamed into place. Loading
refuses key files readable by group or others, as ssh does, and a trust root that does not
name the keys next to it.
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from protocol.bundle import read_envelope
from protocol.dsse import Envelope
from protocol.errors import CodedError, ProtocolError
from protocol.fsio import fsync_dir, write_atomic
from protocol.keys import SigningKey
from protocol.trust import ROLES, RoleName, TrustRoot, build_trust_root, load_trust_root, rotate

TRUST_FILE = "trust.json"
KEY_FILES: dict[RoleName, str] = {r: f"{r}.key" for r in ROLES}
RETIRED_DIR = "retired"
DEFAULT_EXPIRES_DAYS = 365


class KeystoreError(CodedError):
    """A key directory the controller cannot use; the message names the file and the fix."""

    code = "keystore"


@dataclass(frozen=True)
class KeySet:
    root: SigningKey
    release: SigningKey
    operator: SigningKey
    trust_envelope: bytes
    trust: TrustRoot

    def key(self, role: RoleName) -> SigningKey:
        return {"root": self.root, "release": self.release, "operator": self.operator}[role]


def existing_key_files(directory: Path) -> list[str]:
    names = [*KEY_FILES.values(), TRUST_FILE]
    return [n for n in names if (Path(directory) / n).exists()]


def init_keys(
    directory: Path,
    *,
    force: bool = False,
    expires_days: int = DEFAULT_EXPIRES_DAYS,
    now: datetime | None = None,
) -> KeySet:
    """Generate one key per role and a trust root (version 1) self-signed by the root key."""
    directory = Path(directory).expanduser()
    present = existing_key_files(directory)
    if present and not force:
        raise KeystoreError(
            f"{directory} already holds {', '.join(present)}; pass --force to replace them "
            "(devices that trust the old trust.json will then reject everything you sign)"
        )
    if expires_days < 1:
        raise KeystoreError("expires_days must be at least 1")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = {role: SigningKey.generate() for role in ROLES}
    now = now or datetime.now(timezone.utc)
    envelope = build_trust_root(
        root=[keys["root"]],
        release=[keys["release"]],
        operator=[keys["operator"]],
        expires=now + timedelta(days=expires_days),
    ).encode()
    for role, key in keys.items():
        write_atomic(directory / KEY_FILES[role], key.to_pem(), 0o600)
    write_atomic(directory / TRUST_FILE, envelope, 0o644)
    fsync_dir(directory)
    return KeySet(
        keys["root"], keys["release"], keys["operator"], envelope, load_trust_root(envelope, now)
    )


def _read_key(path: Path) -> SigningKey:
    try:
        st = path.stat()
    except FileNotFoundError as e:
        raise KeystoreError(f"{path} is missing; create keys with `jetfleet keys init`") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeystoreError(
            f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        return SigningKey.from_pem(path.read_bytes())
    except ProtocolError as e:
        raise KeystoreError(f"{path}: {e.reason}") from e


def load_keys(directory: Path, *, now: datetime | None = None, check_expiry: bool = True) -> KeySet:
    """The key set of a `keys init` directory, checked against its own trust root."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise KeystoreError(f"key directory {directory} does not exist; run `jetfleet keys init`")
    keys = {role: _read_key(directory / KEY_FILES[role]) for role in ROLES}
    trust_path = directory / TRUST_FILE
    try:
        envelope = trust_path.read_bytes()
    except FileNotFoundError as e:
        raise KeystoreError(f"{trust_path} is missing") from e
    now = now or datetime.now(timezone.utc)
    # Parsing the trust root checks its self-signature; expiry is checked separately so
    # that `keys rotate` can still load an expired set in order to renew it.
    try:
        trust = load_trust_root(envelope, datetime.fromtimestamp(0, timezone.utc))
    except ProtocolError as e:
        raise KeystoreError(f"{trust_path}: {e.reason}") from e
    for role, key in keys.items():
        if key.keyid not in trust.roles[role].keyids:
            raise KeystoreError(
                f"{directory / KEY_FILES[role]} (key {key.keyid[:12]}…) does not hold the "
                f"{role} role in {trust_path}"
            )
    if check_expiry and now >= trust.expires:
        raise KeystoreError(
            f"{trust_path} (version {trust.version}) expired at {trust.expires.isoformat()}; "
            f"renew it with `jetfleet keys rotate {directory}`"
        )
    return KeySet(keys["root"], keys["release"], keys["operator"], envelope, trust)


def retired_keys(directory: Path, role: RoleName) -> list[tuple[int, SigningKey]]:
    """The `role` keys that `rotate_keys` replaced, as (trust root version they served,
    key), newest first: DIR/retired/v<N>/<role>.key."""
    base = Path(directory).expanduser() / RETIRED_DIR
    found: list[tuple[int, SigningKey]] = []
    if not base.is_dir():
        return found
    for sub in base.iterdir():
        if not (sub.name.startswith("v") and sub.name[1:].isdigit()):
            continue
        path = sub / KEY_FILES[role]
        if path.is_file():
            found.append((int(sub.name[1:]), _read_key(path)))
    return sorted(found, key=lambda vk: vk[0], reverse=True)


def trust_chain(directory: Path, keys: KeySet) -> list[bytes]:
    """The trust roots before the current one, oldest first (DIR/retired/v<N>/trust.json):
    what a device several rotations behind walks, one version at a time."""
    base = Path(directory).expanduser() / RETIRED_DIR
    found: list[tuple[int, bytes]] = []
    if base.is_dir():
        for sub in base.iterdir():
            path = sub / TRUST_FILE
            if sub.name.startswith("v") and sub.name[1:].isdigit() and path.is_file():
                found.append((int(sub.name[1:]), path.read_bytes()))
    return [env for version, env in sorted(found) if version < keys.trust.version]


def retired_release_version(directory: Path, keyids: Iterable[str]) -> int | None:
    """The trust root version whose release key (since retired) made one of these
    signatures, or None if none of them is a retired release key of this directory."""
    wanted = set(keyids)
    for version, key in retired_keys(directory, "release"):
        if key.keyid in wanted:
            return version
    return None


def retired_signer_reason(directory: Path | None, bundle: Path, trust: TrustRoot) -> str | None:
    """Why a bundle does not verify when a release key that a rotation retired signed it
    (which key, which trust root retired it, and the fix); None for any other bundle."""
    if directory is None:
        return None
    try:
        keyids = [sig.keyid for sig in read_envelope(bundle).signatures]
        version = retired_release_version(directory, keyids)
    except (ProtocolError, KeystoreError):
        return None
    if version is None or version >= trust.version:
        return None
    return (
        f"signed by release key v{version}, retired by trust root v{trust.version}: "
        f"re-sign it with `jetfleet bundle sign {bundle}`"
    )


def retired_trust(directory: Path, version: int) -> TrustRoot:
    """Trust root `version` as it was before a rotation (DIR/retired/v<N>/trust.json),
    expired or not: to check what its keys signed."""
    path = Path(directory).expanduser() / RETIRED_DIR / f"v{version}" / TRUST_FILE
    try:
        return load_trust_root(path.read_bytes(), datetime.now(timezone.utc), check_expiry=False)
    except OSError as e:
        raise KeystoreError(f"cannot read {path}: {e.strerror}") from e
    except ProtocolError as e:
        raise KeystoreError(f"{path}: {e.reason}") from e


def trust_update_signers(directory: Path, keys: KeySet) -> list[SigningKey]:
    """The operator keys a `trust_update` is signed with: the current one and every
    retired one, newest first (at most a DSSE envelope's 32 signatures).

    A device checks a command against the trust root it holds, which is the one being
    replaced: after a rotation of the operator key only a retired key is still its
    operator. Signatures by keys a device does not know are ignored, so one envelope
    serves devices on any earlier version. Only trust updates are signed this way:
    everything else is signed with the current operator key alone."""
    signers = {keys.operator.keyid: keys.operator}
    for _version, key in retired_keys(directory, "operator"):
        signers.setdefault(key.keyid, key)
    return list(signers.values())[:32]


def rotate_keys(
    directory: Path,
    *,
    roles: Iterable[RoleName] = ("release", "operator"),
    expires_days: int = DEFAULT_EXPIRES_DAYS,
    now: datetime | None = None,
) -> KeySet:
    """A new trust root version with fresh keys for `roles` (the others kept), signed by
    the old root key and the new one (TUF's rotation rule, so devices accept it via
    `protocol.trust.rotate`). Replaced keys move to DIR/retired/v<old version>/."""
    directory = Path(directory).expanduser()
    now = now or datetime.now(timezone.utc)
    old = load_keys(directory, now=now, check_expiry=False)
    wanted = set(roles)
    unknown = wanted - set(ROLES)
    if unknown:
        raise KeystoreError(f"unknown role(s) {', '.join(sorted(unknown))}; roles are {ROLES}")
    new_keys = {r: SigningKey.generate() if r in wanted else old.key(r) for r in ROLES}
    signers = [old.root] if new_keys["root"] is old.root else [old.root, new_keys["root"]]
    envelope = build_trust_root(
        root=[new_keys["root"]],
        release=[new_keys["release"]],
        operator=[new_keys["operator"]],
        version=old.trust.version + 1,
        expires=now + timedelta(days=expires_days),
        sign_with=signers,
    )
    # The same check a device runs before accepting it.
    trust = rotate(old.trust, Envelope.decode(envelope.encode()), now)
    retired = directory / RETIRED_DIR / f"v{old.trust.version}"
    retired.mkdir(parents=True, exist_ok=True, mode=0o700)
    for role in sorted(wanted):
        shutil.copy2(directory / KEY_FILES[role], retired / KEY_FILES[role])
    shutil.copy2(directory / TRUST_FILE, retired / TRUST_FILE)
    fsync_dir(retired)
    for role in sorted(wanted):
        write_atomic(directory / KEY_FILES[role], new_keys[role].to_pem(), 0o600)
    data = envelope.encode()
    write_atomic(directory / TRUST_FILE, data, 0o644)
    fsync_dir(directory)
    return KeySet(new_keys["root"], new_keys["release"], new_keys["operator"], data, trust)
