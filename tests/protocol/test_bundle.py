"""The .jfb bundle: round trip, each docs/security.md threat that applies to a bundle archive."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from protocol.bundle import (
    BLOCK,
    BUNDLE_SUFFIX,
    MAX_MANIFEST_BYTES,
    BundleFormatError,
    BundleTooLargeError,
    MemberMismatchError,
    UnsafeMemberError,
    bundle_filename,
    extract_bundle,
    make_manifest,
    read_envelope,
    tar_header,
    verify_bundle,
    write_bundle,
)
from protocol.dsse import Envelope, sign
from protocol.errors import (
    BundleError,
    PayloadTypeError,
    SignatureError,
    ThresholdError,
    TrustExpiredError,
    UnsignedError,
    VerificationError,
    WrongRoleError,
)
from protocol.keys import SigningKey
from protocol.manifest import MANIFEST_MEMBER, MANIFEST_PAYLOAD_TYPE, Manifest
from protocol.messages import COMMAND_PAYLOAD_TYPE
from protocol.trust import build_trust_root, load_trust_root

NOW = datetime.now(timezone.utc)


def _tiny_onnx(path: Path) -> Path:
    """y = relu(x @ W): a real model ONNX Runtime can run."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = pytest.mark.xdist_group("test_bundle")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("src")
    model = _tiny_onnx(d / "model.onnx")
    golden = d / "golden.npz"
    x = np.ones((2, 4), dtype=np.float32)
    np.savez(
        golden, **{"input.x": x, "output.y": x @ np.arange(12, dtype=np.float32).reshape(4, 3)}
    )
    return {"model.onnx": model, "golden.npz": golden}


def _manifest(files: dict[str, Path], **kw: Any) -> Manifest:
    return make_manifest(
        name="detector",
        version="1.2.0",
        files=files,
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
        **kw,
    )


@pytest.fixture
def bundle(tmp_path: Path, sources: dict[str, Path], trust_material: Any) -> Path:
    m = _manifest(sources)
    return write_bundle(tmp_path / "detector-1.2.0.jfb", m, sources, [trust_material.release])


def _members(path: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member, read with the standard library."""
    with tarfile.open(path, "r:") as t:
        return [(m.name, m.offset, m.offset_data) for m in t.getmembers()]


def _raw_archive(path: Path, members: list[tuple[bytes, bytes]]) -> Path:
    """An archive made of (512-byte header, data) pairs, padded and terminated like tar."""
    with open(path, "wb") as f:
        for header, data in members:
            f.write(header + data + bytes(-len(data) % BLOCK))
        f.write(bytes(2 * BLOCK))
    return path


def _signed_envelope(manifest: Manifest, keys: list[SigningKey]) -> bytes:
    return sign(manifest.encode(), MANIFEST_PAYLOAD_TYPE, keys).encode()


def _hostile(
    path: Path,
    manifest: Manifest,
    keys: list[SigningKey],
    extra: list[tuple[str, bytes]] | None = None,
    skip: tuple[str, ...] = (),
    sources: dict[str, Path] | None = None,
) -> Path:
    """A bundle with a validly signed manifest and whatever members a test wants."""
    env = _signed_envelope(manifest, keys)
    mtime = int(manifest.created_at.timestamp())
    members = [(tar_header(MANIFEST_MEMBER, len(env), mtime), env)]
    for fe in manifest.files:
        if fe.path in skip or sources is None:
            continue
        data = sources[fe.path].read_bytes()
        members.append((tar_header(fe.path, len(data), mtime), data))
    for name, data in extra or []:
        members.append((tar_header(name, len(data), mtime), data))
    return _raw_archive(path, members)


# -- round trip --------------------------------------------------------------------------


def test_bundle_round_trips_and_is_a_plain_tar_with_the_manifest_first(
    bundle: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    assert bundle.name == bundle_filename("detector", "1.2.0")
    assert bundle.suffix == BUNDLE_SUFFIX
    m = verify_bundle(bundle, trust_material.trust, NOW)
    assert (m.name, m.version) == ("detector", "1.2.0")
    assert [n for n, _, _ in _members(bundle)] == [MANIFEST_MEMBER, "model.onnx", "golden.npz"]
    listing = subprocess.run(["tar", "tf", str(bundle)], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == [MANIFEST_MEMBER, "model.onnx", "golden.npz"]
    assert (
        m.file("model.onnx").sha256
        == hashlib.sha256(sources["model.onnx"].read_bytes()).hexdigest()
    )


def test_extract_writes_verified_files_and_reports_the_bundle_sha256(
    bundle: Path, sources: dict[str, Path], tmp_path: Path, trust_material: Any
) -> None:
    dest = tmp_path / "bundles" / "abc"
    vb = extract_bundle(bundle, trust_material.trust, dest, NOW)
    assert vb.root == dest
    assert vb.sha256 == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert vb.model_path.read_bytes() == sources["model.onnx"].read_bytes()
    assert vb.golden_path.read_bytes() == sources["golden.npz"].read_bytes()
    assert sorted(os.listdir(dest)) == ["golden.npz", MANIFEST_MEMBER, "model.onnx"]
    # The kept envelope re-verifies: the extracted bundle can be re-checked later.
    env = Envelope.decode((dest / MANIFEST_MEMBER).read_bytes())
    trust_material.trust.verify(env, "release", MANIFEST_PAYLOAD_TYPE, NOW)
    assert os.listdir(dest.parent) == ["abc"]  # no temp dirs left


def test_extract_refuses_an_existing_destination(
    bundle: Path, tmp_path: Path, trust_material: Any
) -> None:
    dest = tmp_path / "taken"
    dest.mkdir()
    with pytest.raises(FileExistsError):
        extract_bundle(bundle, trust_material.trust, dest, NOW)


def test_verification_reports_progress_up_to_the_whole_file(
    bundle: Path, trust_material: Any
) -> None:
    seen: list[tuple[int, int]] = []
    verify_bundle(bundle, trust_material.trust, NOW, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (bundle.stat().st_size, bundle.stat().st_size)


def test_write_refuses_a_file_changed_after_the_manifest_was_made(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(sources["model.onnx"].read_bytes())
    files = {"model.onnx": model, "golden.npz": sources["golden.npz"]}
    m = _manifest(files)
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleError, match="changed after the manifest"):
        write_bundle(tmp_path / "out.jfb", m, files, [trust_material.release])
    assert os.listdir(tmp_path) == ["model.onnx"]  # no partial output, no temp file


def test_read_envelope_shows_an_unverified_manifest(bundle: Path) -> None:
    env = read_envelope(bundle)
    assert Manifest.decode(env.payload_bytes()).name == "detector"


# -- signatures and the trust root -------------------------------------------------------


def test_unsigned_bundle_is_rejected(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    b = write_bundle(tmp_path / "u.jfb", _manifest(sources), sources, [])
    with pytest.raises(UnsignedError):
        verify_bundle(b, trust_material.trust, NOW)


def test_bundle_signed_by_an_unknown_key_is_rejected(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    b = write_bundle(tmp_path / "k.jfb", _manifest(sources), sources, [SigningKey.generate()])
    with pytest.raises(SignatureError) as e:
        verify_bundle(b, trust_material.trust, NOW)
    assert e.value.code == "bad_signature"


def test_bundle_signed_by_the_operator_key_is_rejected_as_wrong_role(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    b = write_bundle(tmp_path / "r.jfb", _manifest(sources), sources, [trust_material.operator])
    with pytest.raises(WrongRoleError) as e:
        verify_bundle(b, trust_material.trust, NOW)
    assert e.value.code == "wrong_role" and "release" in str(e.value)


def test_bundle_below_the_release_threshold_is_rejected(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    root, r1, r2, op = (SigningKey.generate() for _ in range(4))
    env = build_trust_root(root=[root], release=[r1, r2], operator=[op], thresholds={"release": 2})
    trust = load_trust_root(env.encode(), NOW)
    one = write_bundle(tmp_path / "one.jfb", _manifest(sources), sources, [r1])
    with pytest.raises(ThresholdError, match="1 valid release signature"):
        verify_bundle(one, trust, NOW)
    both = write_bundle(tmp_path / "two.jfb", _manifest(sources), sources, [r1, r2])
    assert verify_bundle(both, trust, NOW).name == "detector"
    # The same key twice is one signer, not two.
    twice = write_bundle(tmp_path / "dup.jfb", _manifest(sources), sources, [r1, r1])
    with pytest.raises(ThresholdError):
        verify_bundle(twice, trust, NOW)


def test_bundle_is_rejected_once_the_trust_root_expired(bundle: Path, trust_material: Any) -> None:
    later = trust_material.trust.expires + timedelta(seconds=1)
    with pytest.raises(TrustExpiredError) as e:
        verify_bundle(bundle, trust_material.trust, later)
    assert e.value.code == "trust_expired"


def test_manifest_signed_as_another_payload_type_is_rejected(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    env = sign(m.encode(), COMMAND_PAYLOAD_TYPE, [trust_material.release]).encode()
    t = int(m.created_at.timestamp())
    b = _raw_archive(tmp_path / "p.jfb", [(tar_header(MANIFEST_MEMBER, len(env), t), env)])
    with pytest.raises(PayloadTypeError):
        verify_bundle(b, trust_material.trust, NOW)


def _replace_envelope(bundle: Path, out: Path, new_env: bytes) -> Path:
    """`bundle` with another manifest member; every other byte kept (headers canonical)."""
    data = bundle.read_bytes()
    next_member = _members(bundle)[1][1]
    mtime = int(data[136:147], 8)
    head = tar_header(MANIFEST_MEMBER, len(new_env), mtime)
    out.write_bytes(head + new_env + bytes(-len(new_env) % BLOCK) + data[next_member:])
    return out


def test_tampered_manifest_is_rejected(bundle: Path, tmp_path: Path, trust_material: Any) -> None:
    env = read_envelope(bundle)
    doc = json.loads(env.payload_bytes())
    doc["gate"]["atol"] = 10.0  # loosen the accuracy gate, keep the signature
    forged = env.model_copy(update={"payload": base64.b64encode(json.dumps(doc).encode()).decode()})
    b = _replace_envelope(bundle, tmp_path / "t.jfb", forged.encode())
    with pytest.raises(SignatureError):
        verify_bundle(b, trust_material.trust, NOW)


def test_tampered_signature_is_rejected(bundle: Path, tmp_path: Path, trust_material: Any) -> None:
    env = read_envelope(bundle)
    sig = bytearray(base64.b64decode(env.signatures[0].sig))
    sig[0] ^= 1
    forged_sig = env.signatures[0].model_copy(update={"sig": base64.b64encode(bytes(sig)).decode()})
    forged = env.model_copy(update={"signatures": [forged_sig]})
    b = _replace_envelope(bundle, tmp_path / "s.jfb", forged.encode())
    with pytest.raises(SignatureError):
        verify_bundle(b, trust_material.trust, NOW)


def test_non_canonical_base64_of_a_valid_signature_is_rejected(
    bundle: Path, tmp_path: Path, trust_material: Any
) -> None:
    env = read_envelope(bundle)
    sig = env.signatures[0].sig
    assert sig.endswith("==")  # 64 bytes: the last data character has 4 spare bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    spare = alphabet[alphabet.index(sig[-3]) | 1]
    forged_sig = env.signatures[0].model_copy(update={"sig": sig[:-3] + spare + "=="})
    assert base64.b64decode(forged_sig.sig) == base64.b64decode(sig)
    b = _replace_envelope(
        bundle, tmp_path / "c.jfb", env.model_copy(update={"signatures": [forged_sig]}).encode()
    )
    with pytest.raises(BundleFormatError, match="canonical"):
        verify_bundle(b, trust_material.trust, NOW)


# -- members against the manifest --------------------------------------------------------


def test_tampered_model_is_rejected_and_extraction_leaves_nothing(
    bundle: Path, tmp_path: Path, trust_material: Any
) -> None:
    offsets = {n: d for n, _, d in _members(bundle)}
    data = bytearray(bundle.read_bytes())
    data[offsets["model.onnx"] + 10] ^= 0x40
    bundle.write_bytes(bytes(data))
    with pytest.raises(MemberMismatchError, match=r"'model\.onnx' has sha256") as e:
        verify_bundle(bundle, trust_material.trust, NOW)
    assert e.value.member == "model.onnx" and e.value.code == "bundle_invalid"
    out = tmp_path / "extract"
    out.mkdir()
    with pytest.raises(MemberMismatchError):
        extract_bundle(bundle, trust_material.trust, out / "b", NOW)
    assert os.listdir(out) == []


def test_tampered_golden_file_fails_extraction_after_the_model_was_written(
    bundle: Path, tmp_path: Path, trust_material: Any
) -> None:
    offsets = {n: d for n, _, d in _members(bundle)}
    data = bytearray(bundle.read_bytes())
    data[offsets["golden.npz"] + 3] ^= 1
    bundle.write_bytes(bytes(data))
    out = tmp_path / "extract"
    out.mkdir()
    with pytest.raises(MemberMismatchError, match=r"golden\.npz"):
        extract_bundle(bundle, trust_material.trust, out / "b", NOW)
    assert os.listdir(out) == []


def test_missing_member_is_rejected(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    b = _hostile(
        tmp_path / "m.jfb", m, [trust_material.release], skip=("golden.npz",), sources=sources
    )
    with pytest.raises(MemberMismatchError, match=r"'golden\.npz'.*missing") as e:
        verify_bundle(b, trust_material.trust, NOW)
    assert e.value.member == "golden.npz"


def test_extra_member_is_rejected_before_its_data_is_read(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    b = _hostile(
        tmp_path / "e.jfb",
        m,
        [trust_material.release],
        [("payload.sh", b"rm -rf /")],
        sources=sources,
    )
    with pytest.raises(MemberMismatchError, match=r"'payload\.sh' is not listed") as e:
        verify_bundle(b, trust_material.trust, NOW)
    assert e.value.member == "payload.sh"


def test_resized_member_is_rejected_at_its_header(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    bigger = sources["golden.npz"].read_bytes() + b"\x00" * 4096
    b = _hostile(
        tmp_path / "r.jfb",
        m,
        [trust_material.release],
        skip=("golden.npz",),
        sources=sources,
        extra=[("golden.npz", bigger)],
    )
    with pytest.raises(
        MemberMismatchError, match=r"'golden.npz' is \d+ bytes, the signed manifest says"
    ):
        verify_bundle(b, trust_material.trust, NOW)


def test_duplicate_member_is_rejected(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    again = sources["model.onnx"].read_bytes()
    b = _hostile(
        tmp_path / "d.jfb",
        m,
        [trust_material.release],
        sources=sources,
        extra=[("model.onnx", again)],
    )
    with pytest.raises(MemberMismatchError, match="twice"):
        verify_bundle(b, trust_material.trust, NOW)


def test_second_manifest_member_is_rejected_as_a_duplicate(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    b = _hostile(
        tmp_path / "d.jfb",
        m,
        [trust_material.release],
        sources=sources,
        extra=[(MANIFEST_MEMBER, b"{}")],
    )
    with pytest.raises(MemberMismatchError, match="twice"):
        verify_bundle(b, trust_material.trust, NOW)


# -- unsafe archive members --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [("../../etc/cron.d/evil", "path traversal"), ("models/../../x", "path traversal"),
     ("/etc/passwd", "absolute path"), ("./model.onnx", "'.' component")],
)  # fmt: skip
def test_unsafe_member_path_is_rejected(
    name: str, words: str, tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    b = _hostile(
        tmp_path / "p.jfb", m, [trust_material.release], sources=sources, extra=[(name, b"x")]
    )
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafeMemberError, match=words) as e:
        extract_bundle(b, trust_material.trust, out / "b", NOW)
    assert e.value.member == name
    assert os.listdir(out) == []
    assert not (tmp_path / "etc").exists()


def _with_tarfile_member(
    path: Path, manifest: Manifest, keys: list[SigningKey], info: tarfile.TarInfo
) -> Path:
    """A signed manifest followed by one member written by Python's tarfile (links, devices)."""
    env = _signed_envelope(manifest, keys)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        head = tarfile.TarInfo(MANIFEST_MEMBER)
        head.size = len(env)
        t.addfile(head, io.BytesIO(env))
        t.addfile(info)
    data = bytearray(buf.getvalue())
    # Put the canonical manifest header back so the archive gets past its first member.
    data[:BLOCK] = tar_header(MANIFEST_MEMBER, len(env), int(manifest.created_at.timestamp()))
    path.write_bytes(bytes(data))
    return path


def _info(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("info", "words"),
    [
        (_info("model.onnx", tarfile.SYMTYPE, "/etc/shadow"), "symbolic link"),
        (_info("golden.npz", tarfile.LNKTYPE, "/etc/shadow"), "hard link"),
        (_info("model.onnx", tarfile.CHRTYPE), "character device"),
        (_info("model.onnx", tarfile.BLKTYPE), "block device"),
        (_info("model.onnx", tarfile.FIFOTYPE), "FIFO"),
        (_info("models", tarfile.DIRTYPE), "directory"),
    ],
    ids=["symlink", "hardlink", "chardev", "blockdev", "fifo", "dir"],
)
def test_links_devices_and_fifos_are_rejected(
    info: tarfile.TarInfo, words: str, tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    b = _with_tarfile_member(tmp_path / "l.jfb", _manifest(sources), [trust_material.release], info)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafeMemberError, match=words) as e:
        extract_bundle(b, trust_material.trust, out / "b", NOW)
    assert e.value.member.rstrip("/") == info.name and e.value.code == "bundle_invalid"
    assert os.listdir(out) == []


def test_pax_headers_are_refused(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    info = tarfile.TarInfo("model.onnx")
    info.pax_headers = {"path": "../../evil"}
    env = _signed_envelope(_manifest(sources), [trust_material.release])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(info, io.BytesIO(b""))
    m = _manifest(sources)
    head = tar_header(MANIFEST_MEMBER, len(env), int(m.created_at.timestamp()))
    pad = bytes(-len(env) % BLOCK)
    b = tmp_path / "x.jfb"
    b.write_bytes(head + env + pad + buf.getvalue())
    with pytest.raises(UnsafeMemberError, match="pax"):
        verify_bundle(b, trust_material.trust, NOW)


# -- sizes and archive structure ---------------------------------------------------------


def test_bundle_over_the_size_cap_is_rejected_before_reading(
    bundle: Path, trust_material: Any
) -> None:
    with pytest.raises(BundleTooLargeError) as e:
        verify_bundle(bundle, trust_material.trust, NOW, max_size=bundle.stat().st_size - 1)
    assert e.value.code == "too_large"
    assert verify_bundle(bundle, trust_material.trust, NOW, max_size=bundle.stat().st_size)


def test_manifest_declaring_endless_data_is_rejected_by_the_cap(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    m = _manifest(sources)
    huge = m.model_copy(
        update={"files": [f.model_copy(update={"size": 50 << 30}) for f in m.files]}
    )
    b = _hostile(tmp_path / "h.jfb", huge, [trust_material.release])
    with pytest.raises(BundleTooLargeError, match="manifest declares"):
        verify_bundle(b, trust_material.trust, NOW, max_size=64 << 20)


def test_oversized_manifest_member_is_rejected_before_it_is_read(
    tmp_path: Path, trust_material: Any
) -> None:
    b = tmp_path / "big.jfb"
    with open(b, "wb") as f:
        f.write(tar_header(MANIFEST_MEMBER, MAX_MANIFEST_BYTES + 1, 0))
        f.truncate(BLOCK + MAX_MANIFEST_BYTES + 1)
    with pytest.raises(BundleTooLargeError, match="cap"):
        verify_bundle(b, trust_material.trust, NOW)


def test_first_member_other_than_the_manifest_is_rejected(
    tmp_path: Path, trust_material: Any
) -> None:
    b = _raw_archive(tmp_path / "f.jfb", [(tar_header("model.onnx", 3, 0), b"abc")])
    with pytest.raises(BundleFormatError, match=r"starts with manifest\.dsse\.json"):
        verify_bundle(b, trust_material.trust, NOW)


def test_trailing_data_after_the_archive_is_rejected(bundle: Path, trust_material: Any) -> None:
    with open(bundle, "ab") as f:
        f.write(b"#!/bin/sh\n")
    with pytest.raises(BundleFormatError, match="trailing data"):
        verify_bundle(bundle, trust_material.trust, NOW)


def test_non_canonical_header_fields_are_rejected(bundle: Path, trust_material: Any) -> None:
    (_, off, _) = _members(bundle)[1]
    data = bytearray(bundle.read_bytes())
    header = bytearray(data[off : off + BLOCK])
    header[100:108] = b"0004755\0"  # setuid mode
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[off : off + BLOCK] = header
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleFormatError, match="canonical"):
        verify_bundle(bundle, trust_material.trust, NOW)


def test_truncated_bundle_names_where_it_ends(bundle: Path, trust_material: Any) -> None:
    (_, _, data_off) = _members(bundle)[1]
    bundle.write_bytes(bundle.read_bytes()[: data_off + 100])
    with pytest.raises(BundleFormatError, match=r"truncated.*inside member 'model.onnx'"):
        verify_bundle(bundle, trust_material.trust, NOW)


def test_a_directory_or_missing_path_is_a_bundle_error(tmp_path: Path, trust_material: Any) -> None:
    with pytest.raises(BundleFormatError):
        verify_bundle(tmp_path, trust_material.trust, NOW)
    with pytest.raises(BundleFormatError, match="cannot open"):
        verify_bundle(tmp_path / "nope.jfb", trust_material.trust, NOW)


def test_every_bundle_error_is_a_verification_error() -> None:
    for cls in (BundleFormatError, UnsafeMemberError, MemberMismatchError, BundleTooLargeError):
        assert issubclass(cls, BundleError) and issubclass(cls, VerificationError)


def test_members_in_subdirectories_and_long_paths_round_trip(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    long_path = "d" * 90 + "/" + "f" * 90  # over ustar's 100-byte name field: uses the prefix
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    files = {
        **sources,
        "labels/classes.txt": tmp_path / "labels.txt",
        long_path: tmp_path / "labels.txt",
    }
    b = write_bundle(tmp_path / "s.jfb", _manifest(files), files, [trust_material.release])
    assert [n for n, _, _ in _members(b)][-2:] == ["labels/classes.txt", long_path]
    vb = extract_bundle(b, trust_material.trust, tmp_path / "out", NOW)
    assert (vb.root / "labels" / "classes.txt").read_text() == "cat\ndog\n"
    assert (vb.root / long_path).read_text() == "cat\ndog\n"


def test_a_member_path_colliding_with_another_members_directory_is_rejected(
    tmp_path: Path, sources: dict[str, Path], trust_material: Any
) -> None:
    (tmp_path / "x").write_bytes(b"x")
    files = {**sources, "extra": tmp_path / "x", "extra/inner": tmp_path / "x"}
    b = write_bundle(tmp_path / "c.jfb", _manifest(files), files, [trust_material.release])
    with pytest.raises(UnsafeMemberError, match="collides"):
        extract_bundle(b, trust_material.trust, tmp_path / "out", NOW)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
