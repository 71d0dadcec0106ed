"""Property tests: no corruption of a bundle ever verifies, and none raises anything but a
VerificationError (the agent turns exactly those into REJECTED events)."""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.bundle import BLOCK, extract_bundle, make_manifest, verify_bundle, write_bundle
from protocol.errors import VerificationError
from protocol.keys import SigningKey
from protocol.trust import TrustRoot, build_trust_root, load_trust_root

NOW = datetime.now(timezone.utc)
Signed = tuple[bytes, TrustRoot, Path]
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = pytest.mark.xdist_group("test_bundle_properties")


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    d = tmp_path_factory.mktemp("prop")
    root, release, operator = (SigningKey.generate() for _ in range(3))
    trust = load_trust_root(
        build_trust_root(root=[root], release=[release], operator=[operator]).encode(), NOW
    )
    # Sizes that are not multiples of 512, so every member has padding to corrupt.
    (d / "model.onnx").write_bytes(os.urandom(1500))
    (d / "golden.npz").write_bytes(os.urandom(333))
    files = {"model.onnx": d / "model.onnx", "golden.npz": d / "golden.npz"}
    manifest = make_manifest(
        name="m",
        version="0.1.0",
        files=files,
        inputs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [1, 3]}],
    )
    path = write_bundle(d / "m-0.1.0.jfb", manifest, files, [release])
    verify_bundle(path, trust, NOW)  # the pristine bundle verifies
    return path.read_bytes(), trust, d


def _rejected(data: bytes, trust: TrustRoot, where: Path) -> VerificationError:
    path = where / "candidate.jfb"
    path.write_bytes(data)
    try:
        verify_bundle(path, trust, NOW)
    except VerificationError as e:
        assert e.code and str(e)
        return e
    raise AssertionError("a corrupted bundle verified")


@FAST
@given(st.data())
def test_every_single_bit_flip_is_rejected(signed: Signed, data: st.DataObject) -> None:
    raw, trust, d = signed
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    _rejected(bytes(flipped), trust, d)


@FAST
@given(st.data())
def test_truncation_at_any_offset_is_rejected(signed: Signed, data: st.DataObject) -> None:
    raw, trust, d = signed
    # Favour the boundaries: inside headers, at data starts, in padding, in the end marker.
    boundaries = sorted({b + k for b in range(0, len(raw), BLOCK) for k in (-1, 0, 1, 200)})
    cut = data.draw(
        st.one_of(
            st.sampled_from([b for b in boundaries if 0 <= b < len(raw)]),
            st.integers(0, len(raw) - 1),
        )
    )
    _rejected(raw[:cut], trust, d)


@FAST
@given(st.binary(min_size=0, max_size=4096))
def test_random_bytes_are_rejected(signed: Signed, blob: bytes) -> None:
    _, trust, d = signed
    _rejected(blob, trust, d)


@FAST
@given(st.data())
def test_random_bytes_spliced_into_a_bundle_are_rejected(
    signed: Signed, data: st.DataObject
) -> None:
    raw, trust, d = signed
    at = data.draw(st.integers(0, len(raw) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=600))
    mutated = raw[:at] + junk + raw[at + len(junk) :]
    if mutated == raw:
        return
    _rejected(mutated, trust, d)


def test_exhaustive_byte_corruption_of_every_header_is_rejected(signed: Signed) -> None:
    """Every byte of every tar header (and of the end marker), incremented: all rejected."""
    raw, trust, d = signed
    headers = [0]
    off = 0
    while True:
        size = int(raw[off + 124 : off + 135], 8)
        off += BLOCK + size + (-size % BLOCK)
        if raw[off : off + BLOCK] == bytes(BLOCK):
            break
        headers.append(off)
    for h in [*headers, off, off + BLOCK]:
        for i in range(h, h + BLOCK):
            mutated = bytearray(raw)
            mutated[i] = (mutated[i] + 1) % 256
            _rejected(bytes(mutated), trust, d)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_a_bit_flipped_bundle_is_never_extracted_and_leaves_nothing(
    signed: Signed, data: st.DataObject
) -> None:
    raw, trust, d = signed
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    work = Path(tempfile.mkdtemp(dir=d))
    (work / "b.jfb").write_bytes(bytes(flipped))
    with pytest.raises(VerificationError):
        extract_bundle(work / "b.jfb", trust, work / "out", NOW)
    assert os.listdir(work) == ["b.jfb"]
    shutil.rmtree(work)
