"""The deployment bundle (docs/protocol.md): one uncompressed POSIX tar, `NAME-VERSION.jfb`.

Layout, in this order:

    manifest.dsse.json   the release-signed DSSE envelope of the Manifest (at most 1 MiB)
    <every file the manifest lists>   e.g. model.onnx, golden.npz, and the model's external
                         weight files (weights-<sha256>.bin, which model.onnx names)

The manifest comes first so that a reader checks the signature before it reads a single
byte of anything else, and then checks each member against the signed list (name, size,
SHA-256) while it streams it: constant memory whatever the model size, no member data is
read beyond the size the signed manifest declares for it.

The archive is canonical: every header is exactly the one `write_bundle` would write for
that name and size (plain file, mode 0644, owner 0/0, mtime = the manifest's created_at),
padding and the end-of-archive marker are zero, nothing follows it. So any change to any
byte of a bundle, not only to the signed content, makes it fail verification.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from protocol.dsse import Envelope, sign
from protocol.errors import (  # the bundle's errors, importable from here too
    BundleError,
    BundleFormatError,
    BundleTooLargeError,
    MemberMismatchError,
    MessageError,
    UnsafeMemberError,
)
from protocol.fsio import atomic_file, fsync_dir, sha256_file
from protocol.keys import SigningKey
from protocol.manifest import (
    MANIFEST_MEMBER,
    MANIFEST_PAYLOAD_TYPE,
    BuildOptions,
    FileEntry,
    GateSpec,
    Manifest,
    Targets,
    TensorSpec,
)
from protocol.trust import TrustRoot

BUNDLE_SUFFIX = ".jfb"
GOLDEN_INPUT_PREFIX = "input."
GOLDEN_OUTPUT_PREFIX = "output."
MAX_MANIFEST_BYTES = 1 << 20  # the envelope member; a real one is a few KiB
CHUNK = 1 << 20  # read/hash/write granularity: large enough to run at hashlib's speed
BLOCK = 512

Progress = Callable[[int, int], None]  # (bytes done, bytes expected)


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedBundle:
    """An extracted bundle whose every file matched the release-signed manifest."""

    manifest: Manifest
    root: Path
    sha256: str  # of the .jfb file

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model

    @property
    def golden_path(self) -> Path:
        return self.root / self.manifest.golden


def bundle_filename(name: str, version: str) -> str:
    return f"{name}-{version}{BUNDLE_SUFFIX}"


# -- tar headers -------------------------------------------------------------------------

_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long-name header",
    b"K": "a GNU long-link header",
    b"S": "a GNU sparse file",
}


def _octal(value: int, width: int) -> bytes:
    """A ustar numeric field: zero-padded octal digits, then NUL."""
    digits = b"%0*o" % (width - 1, value)
    if len(digits) != width - 1:
        raise BundleTooLargeError(f"value {value} does not fit a {width}-byte tar field")
    return digits + b"\0"


def _split_name(name: str) -> tuple[bytes, bytes]:
    raw = name.encode("utf-8")
    if len(raw) <= 100:
        return raw, b""
    # ustar: prefix (up to 155 bytes) + "/" + name (up to 100 bytes).
    for i in range(len(raw) - 1, 0, -1):
        if raw[i : i + 1] == b"/" and i <= 155 and len(raw) - i - 1 <= 100:
            return raw[i + 1 :], raw[:i]
    raise BundleError(f"member path {name!r} is too long for a ustar header")


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """The canonical ustar header jetfleet writes for a plain file member."""
    short, prefix = _split_name(name)
    block = bytearray(BLOCK)
    block[0 : len(short)] = short
    block[100:108] = _octal(0o644, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(max(0, mtime), 12)
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[329:337] = _octal(0, 8)
    block[337:345] = _octal(0, 8)
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _pad(size: int) -> int:
    return -size % BLOCK


@dataclass(frozen=True)
class _Header:
    name: str
    size: int
    mtime: int
    offset: int


def _parse_octal(field: bytes, what: str, offset: int) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text or any(c not in b"01234567" for c in text):
        raise BundleFormatError(f"tar header at offset {offset}: {what} field is not octal")
    return int(text, 8)


def _check_member_path(name: str) -> None:
    """The same rules the manifest applies to its paths, with the threat named."""
    if name.startswith("/"):
        raise UnsafeMemberError(
            f"member {name!r} has an absolute path; bundle members are relative names",
            member=name,
        )
    if "\\" in name or "\0" in name:
        raise UnsafeMemberError(f"member {name!r} contains a backslash or NUL", member=name)
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeMemberError(f"member {name!r} escapes the bundle (path traversal)", member=name)
    if any(p in ("", ".") for p in parts):
        raise UnsafeMemberError(f"member {name!r} has an empty or '.' component", member=name)


def _parse_header(block: bytes, offset: int) -> _Header:
    stored = _parse_octal(block[148:156], "checksum", offset)
    actual = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != actual:
        raise BundleFormatError(
            f"corrupt tar header at offset {offset} (checksum {stored:o}, computed {actual:o})"
        )
    if block[257:265] != b"ustar\x0000":
        raise BundleFormatError(f"tar header at offset {offset} is not a POSIX ustar header")
    try:
        short = block[0:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleFormatError(f"tar header at offset {offset}: name is not UTF-8") from e
    name = f"{prefix}/{short}" if prefix else short
    if not name:
        raise BundleFormatError(f"tar header at offset {offset} has an empty name")
    kind = block[156:157]
    if kind not in (b"0", b"\0"):
        what = _TYPE_NAMES.get(kind, f"of unknown type {kind!r}")
        link = block[157:257].split(b"\0", 1)[0].decode("utf-8", "replace")
        to = f" (to {link!r})" if kind in (b"1", b"2") else ""
        raise UnsafeMemberError(
            f"member {name!r} is {what}{to}; a bundle holds plain files only", member=name
        )
    _check_member_path(name)
    size = _parse_octal(block[124:136], "size", offset)
    mtime = _parse_octal(block[136:148], "mtime", offset)
    if block != tar_header(name, size, mtime):
        raise BundleFormatError(
            f"tar header of member {name!r} is not in jetfleet's canonical form "
            "(mode, owner, link or device fields were changed)"
        )
    return _Header(name, size, mtime, offset)


# -- reading -----------------------------------------------------------------------------


class _Reader:
    """Sequential reads from a raw file into one reused buffer (no copies, no BufferedReader);
    optionally hashes every byte it returns, for the sha256 of the whole .jfb."""

    def __init__(self, f: BinaryIO, whole_file_hash: bool) -> None:
        self.f = f
        self.offset = 0
        self.view = memoryview(bytearray(CHUNK))
        self.file_hash = hashlib.sha256() if whole_file_hash else None

    def read(self, n: int, what: str) -> memoryview:
        """Exactly n (<= CHUNK) bytes, or BundleFormatError saying where the file ended."""
        got = 0
        while got < n:
            k = self.f.readinto(self.view[got:n])  # type: ignore[attr-defined]
            if not k:
                raise BundleFormatError(
                    f"bundle is truncated: it ends at byte {self.offset + got} inside {what}"
                )
            got += k
        self.offset += n
        out = self.view[:n]
        if self.file_hash is not None:
            self.file_hash.update(out)
        return out

    def at_eof(self) -> bool:
        return not self.f.read(1)


def _zero(view: memoryview) -> bool:
    return view.tobytes().count(0) == len(view)


def _read_padding(r: _Reader, size: int, name: str) -> None:
    pad = _pad(size)
    if pad and not _zero(r.read(pad, f"the padding of member {name!r}")):
        raise BundleFormatError(f"non-zero padding after member {name!r} (offset {r.offset})")


def _stream(
    r: _Reader,
    header: _Header,
    sink: BinaryIO | None,
    progress: Progress | None,
    total: int,
) -> str:
    h = hashlib.sha256()
    remaining = header.size
    what = f"member {header.name!r}"
    while remaining:
        chunk = r.read(min(remaining, CHUNK), what)
        h.update(chunk)
        if sink is not None:
            sink.write(chunk)
        remaining -= len(chunk)
        if progress is not None:
            progress(r.offset, total)
    _read_padding(r, header.size, header.name)
    return h.hexdigest()


def _canonical_envelope(envelope: Envelope) -> bytes:
    """The exact bytes write_bundle writes for this envelope: rejects every re-encoding
    (whitespace, base64 with non-zero spare bits) that would still verify."""
    payload = envelope.payload_bytes()
    sigs = []
    for s in envelope.signatures:
        try:
            raw = base64.b64decode(s.sig, validate=True)
        except ValueError:
            raw = b""
        sigs.append({"keyid": s.keyid, "sig": base64.b64encode(raw).decode("ascii")})
    return Envelope.model_validate(
        {
            "payloadType": envelope.payload_type,
            "payload": base64.b64encode(payload).decode("ascii"),
            "signatures": sigs,
        }
    ).encode()


NOT_A_BUNDLE = "not a jetfleet bundle: a .jfb is a signed tar archive and this file is no tar"


def _read_manifest_member(r: _Reader) -> tuple[_Header, bytes]:
    """The first member, which must be the (size-capped) manifest envelope."""
    try:
        block = r.read(BLOCK, "the first tar header").tobytes()
    except BundleFormatError as e:
        raise BundleFormatError(NOT_A_BUNDLE) from e
    if _zero(memoryview(block)):
        raise BundleFormatError("bundle is an empty tar archive")
    if not block[257:262] == b"ustar":  # not even a tar (an .onnx, a zip...)
        raise BundleFormatError(NOT_A_BUNDLE)
    header = _parse_header(block, 0)
    if header.name != MANIFEST_MEMBER:
        raise BundleFormatError(
            f"first member is {header.name!r}; a bundle starts with {MANIFEST_MEMBER}"
        )
    if header.size > MAX_MANIFEST_BYTES:
        raise BundleTooLargeError(
            f"{MANIFEST_MEMBER} declares {header.size} bytes, the cap is {MAX_MANIFEST_BYTES}"
        )
    data = r.read(header.size, f"member {MANIFEST_MEMBER!r}").tobytes()
    _read_padding(r, header.size, MANIFEST_MEMBER)
    return header, data


def _decode_envelope(data: bytes) -> Envelope:
    try:
        return Envelope.decode(data)
    except MessageError as e:
        raise BundleFormatError(f"{MANIFEST_MEMBER}: {e.reason}") from e


def _read_manifest(r: _Reader, trust: TrustRoot, now: datetime) -> tuple[bytes, Manifest, _Header]:
    header, data = _read_manifest_member(r)
    envelope = _decode_envelope(data)
    try:
        payload = trust.verify(envelope, "release", MANIFEST_PAYLOAD_TYPE, now)
    except MessageError as e:  # a payload that is not base64
        raise BundleFormatError(f"{MANIFEST_MEMBER}: {e.reason}") from e
    if data != _canonical_envelope(envelope):
        raise BundleFormatError(f"{MANIFEST_MEMBER} is signed but not canonically encoded")
    try:
        manifest = Manifest.decode(payload)
    except MessageError as e:
        raise BundleError(f"signed manifest is invalid: {e.reason}") from e
    if header.mtime != _mtime(manifest):
        raise BundleFormatError(
            f"tar header of {MANIFEST_MEMBER} has mtime {header.mtime}, "
            "not the manifest's created_at"
        )
    return data, manifest, header


def _mtime(manifest: Manifest) -> int:
    return max(0, int(manifest.created_at.timestamp()))


def expected_size(manifest: Manifest, manifest_member_size: int) -> int:
    """The exact byte size of the canonical .jfb for this manifest."""
    n = BLOCK + manifest_member_size + _pad(manifest_member_size) + 2 * BLOCK
    for f in manifest.files:
        n += BLOCK + f.size + _pad(f.size)
    return n


def _open_bundle(path: Path, max_size: int | None) -> BinaryIO:
    """The bundle file, opened raw (for readinto) once it is a regular file within limits."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
    except OSError as e:
        raise BundleFormatError(f"cannot open bundle {path}: {e.strerror}") from e
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BundleFormatError(f"{path} is not a regular file")
        _check_size(st.st_size, max_size, f"bundle is {st.st_size} bytes")
    except BaseException:
        f.close()
        raise
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return f


def _check_size(size: int, max_size: int | None, what: str) -> None:
    if max_size is not None and size > max_size:
        raise BundleTooLargeError(f"{what}, more than the {max_size}-byte limit")


def _end_of_archive(r: _Reader, block: bytes, at: int) -> bool:
    """True at the two zero blocks that end the archive, which must end the file too."""
    if not _zero(memoryview(block)):
        return False
    if not _zero(r.read(BLOCK, "the end-of-archive marker")):
        raise BundleFormatError(f"corrupt end-of-archive marker at offset {at}")
    if not r.at_eof():
        raise BundleFormatError(
            f"trailing data after the end-of-archive marker (offset {r.offset})"
        )
    return True


def _expected_entry(
    header: _Header, expected: dict[str, FileEntry], seen: set[str], mtime: int
) -> FileEntry:
    """The signed manifest's entry for this tar header, which must match it exactly."""
    name = header.name
    if name in seen or name == MANIFEST_MEMBER:
        raise MemberMismatchError(f"member {name!r} appears twice in the archive", member=name)
    entry = expected.get(name)
    if entry is None:
        raise MemberMismatchError(
            f"member {name!r} is not listed in the signed manifest", member=name
        )
    if header.size != entry.size:
        raise MemberMismatchError(
            f"member {name!r} is {header.size} bytes, the signed manifest says {entry.size}",
            member=name,
        )
    if header.mtime != mtime:
        raise BundleFormatError(
            f"tar header of member {name!r} has mtime {header.mtime}, not the manifest's created_at"
        )
    return entry


def _member_digest(
    r: _Reader, header: _Header, dest_tmp: Path | None, progress: Progress | None, total: int
) -> str:
    """Hash the member's bytes, writing them (fsynced) under dest_tmp when extracting."""
    if dest_tmp is None:
        return _stream(r, header, None, progress, total)
    with _open_member(dest_tmp, header.name) as out:
        digest = _stream(r, header, out, progress, total)
        out.flush()
        os.fsync(out.fileno())
    return digest


def _check_digest(name: str, digest: str, entry: FileEntry) -> None:
    if digest != entry.sha256:
        raise MemberMismatchError(
            f"member {name!r} has sha256 {digest[:16]}…, the signed manifest "
            f"says {entry.sha256[:16]}… (tampered or corrupt)",
            member=name,
        )


def _check_all_present(expected: dict[str, FileEntry], seen: set[str]) -> None:
    missing = [p for p in expected if p not in seen]
    if missing:
        raise MemberMismatchError(
            f"member(s) {', '.join(repr(m) for m in missing)} listed in the signed manifest "
            "are missing from the archive",
            member=missing[0],
        )


def _walk(
    path: Path,
    trust: TrustRoot,
    now: datetime,
    max_size: int | None,
    *,
    dest_tmp: Path | None,
    progress: Progress | None,
) -> tuple[Manifest, str | None]:
    """The one reader behind verify and extract: every check, in stream order."""
    with _open_bundle(path, max_size) as f:
        r = _Reader(f, whole_file_hash=dest_tmp is not None)
        envelope_bytes, manifest, mheader = _read_manifest(r, trust, now)
        total = expected_size(manifest, mheader.size)
        _check_size(total, max_size, f"manifest declares a {total}-byte bundle")
        if dest_tmp is not None:
            # The envelope is kept beside the files so the bundle can be re-verified later.
            _write_member(dest_tmp, MANIFEST_MEMBER, envelope_bytes)
        expected: dict[str, FileEntry] = {fe.path: fe for fe in manifest.files}
        seen: set[str] = set()
        mtime = _mtime(manifest)
        while True:
            at = r.offset
            block = r.read(BLOCK, "a tar header").tobytes()
            if _end_of_archive(r, block, at):
                break
            header = _parse_header(block, at)
            entry = _expected_entry(header, expected, seen, mtime)
            seen.add(header.name)
            _check_digest(header.name, _member_digest(r, header, dest_tmp, progress, total), entry)
        _check_all_present(expected, seen)
        if progress is not None:
            progress(r.offset, total)
        return manifest, (r.file_hash.hexdigest() if r.file_hash is not None else None)


def _open_member(root: Path, name: str) -> BinaryIO:
    target = root / name
    # Names were checked (relative, no '..'), and every directory under root is ours.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, flags, 0o644)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        # e.g. a manifest listing both "a" and "a/b": a conflict, not an I/O failure.
        raise UnsafeMemberError(
            f"member {name!r} collides with another member's path", member=name
        ) from e
    # Buffered: its write() always writes everything, and chunks >= its buffer go straight
    # to the file without a copy.
    return os.fdopen(fd, "wb")


def _write_member(root: Path, name: str, data: bytes) -> None:
    with _open_member(root, name) as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


# -- public API --------------------------------------------------------------------------


def read_envelope(path: Path) -> Envelope:
    """The manifest envelope of a bundle, NOT verified: for `bundle inspect` and tools that
    show what a bundle claims before trusting it."""
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as e:
        raise BundleFormatError(f"cannot open bundle {path}: {e.strerror}") from e
    with f:
        _, data = _read_manifest_member(_Reader(f, whole_file_hash=False))
    return _decode_envelope(data)


def verify_bundle(
    path: Path,
    trust: TrustRoot,
    now: datetime,
    *,
    max_size: int | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Check a .jfb completely without extracting anything; return its signed manifest.

    Raises a BundleError subclass naming the member and what is wrong with it, or the
    signature errors of the release-role check (UnsignedError, SignatureError,
    WrongRoleError, ThresholdError, PayloadTypeError, TrustExpiredError).
    """
    manifest, _ = _walk(Path(path), trust, now, max_size, dest_tmp=None, progress=progress)
    return manifest


def extract_bundle(
    path: Path,
    trust: TrustRoot,
    dest: Path,
    now: datetime,
    *,
    max_size: int | None = None,
    progress: Progress | None = None,
) -> VerifiedBundle:
    """Verify while extracting into a temporary directory next to `dest`, fsync, rename to
    `dest`. `dest` must not exist (FileExistsError). On any error nothing is left behind."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"extraction target {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        manifest, sha = _walk(Path(path), trust, now, max_size, dest_tmp=tmp, progress=progress)
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
            fsync_dir(d)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    assert sha is not None
    return VerifiedBundle(manifest=manifest, root=dest, sha256=sha)


def make_manifest(
    *,
    name: str,
    version: str,
    files: Mapping[str, Path],
    inputs: Sequence[TensorSpec | Mapping[str, Any]],
    outputs: Sequence[TensorSpec | Mapping[str, Any]],
    model: str = "model.onnx",
    golden: str = "golden.npz",
    build: BuildOptions | Mapping[str, Any] | None = None,
    targets: Targets | Mapping[str, Any] | None = None,
    gate: GateSpec | Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
) -> Manifest:
    """A manifest for `files` (bundle path -> source file), hashing each file."""
    entries = []
    for bpath, src in files.items():
        digest, size = _hash_file(Path(src))
        entries.append({"path": bpath, "size": size, "sha256": digest})
    fields: dict[str, Any] = {
        "name": name,
        "version": version,
        "files": entries,
        "inputs": [_dump(t) for t in inputs],
        "outputs": [_dump(t) for t in outputs],
        "model": model,
        "golden": golden,
    }
    for key, value in (("build", build), ("targets", targets), ("gate", gate)):
        if value is not None:
            fields[key] = _dump(value)
    if created_at is not None:
        fields["created_at"] = created_at
    # Whole seconds: the tar headers carry created_at as their mtime.
    manifest = Manifest.new(**fields)
    return manifest.model_copy(update={"created_at": manifest.created_at.replace(microsecond=0)})


def _dump(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else dict(value)


def _hash_file(path: Path) -> tuple[str, int]:
    size = 0

    def count(done: int) -> None:
        nonlocal size
        size = done

    return sha256_file(path, count), size


def write_bundle(
    out: Path,
    manifest: Manifest,
    files: Mapping[str, Path],
    release_keys: Iterable[SigningKey],
) -> Path:
    """Sign `manifest` with the release keys and write the canonical .jfb atomically
    (temp file in the same directory, fsync, rename, fsync the directory).

    Every file is re-hashed while it is copied: a file that changed since `make_manifest`
    is refused (BundleError) instead of producing a bundle that can never verify."""
    out = Path(out)
    listed = {f.path for f in manifest.files}
    if set(files) != listed:
        extra = sorted(set(files) - listed)
        missing = sorted(listed - set(files))
        raise BundleError(f"files do not match the manifest: extra {extra}, missing {missing}")
    envelope = sign(manifest.encode(), MANIFEST_PAYLOAD_TYPE, release_keys)
    env_bytes = envelope.encode()
    if len(env_bytes) > MAX_MANIFEST_BYTES:
        raise BundleTooLargeError(f"signed manifest is {len(env_bytes)} bytes, over the cap")
    mtime = _mtime(manifest)
    with atomic_file(out, 0o644) as w:
        w.write(tar_header(MANIFEST_MEMBER, len(env_bytes), mtime))
        w.write(env_bytes + bytes(_pad(len(env_bytes))))
        view = memoryview(bytearray(CHUNK))
        for entry in manifest.files:
            w.write(tar_header(entry.path, entry.size, mtime))
            h = hashlib.sha256()
            size = 0
            with open(files[entry.path], "rb", buffering=0) as src:
                while n := src.readinto(view):
                    if size + n > entry.size:
                        break
                    h.update(view[:n])
                    w.write(view[:n])
                    size += n
            if size != entry.size or h.hexdigest() != entry.sha256:
                raise BundleError(
                    f"{files[entry.path]} changed after the manifest was made "
                    f"(member {entry.path!r})"
                )
            w.write(bytes(_pad(entry.size)))
        w.write(bytes(2 * BLOCK))
    return out
