"""The one copy of the durable-write and file-hash helpers every package uses."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from protocol.fsio import TMP_INFIX, atomic_file, fsync_dir, sha256_file, write_atomic


def test_an_atomic_write_replaces_the_whole_file_with_the_mode_given(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "root.key"
    write_atomic(key, b"old")
    write_atomic(key, b"new secret", 0o600)
    assert key.read_bytes() == b"new secret"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert [p.name for p in key.parent.iterdir()] == ["root.key"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "serve.json"
    write_atomic(path, b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half")
        raise RuntimeError("disk pulled")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["serve.json"]


def test_the_temporary_file_is_named_for_the_engine_cache_sweep(tmp_path: Path) -> None:
    path = tmp_path / "engine.json"
    with atomic_file(path) as f:
        (temp,) = [p for p in tmp_path.iterdir() if p.name != "engine.json"]
        assert temp.name.startswith(".engine.json") and TMP_INFIX in temp.name
        f.write(b"{}")


def test_sha256_file_matches_hashlib_and_reports_each_chunk(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    seen: list[int] = []
    assert sha256_file(path, seen.append) == hashlib.sha256(data).hexdigest()
    assert seen[-1] == len(data) and seen == sorted(seen) and len(seen) == 4


def test_a_chunk_callback_that_raises_stops_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "bundle.jfb"
    path.write_bytes(bytes(3 << 20))
    calls: list[int] = []

    def cancel(done: int) -> None:
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sha256_file(path, cancel)
    assert calls == [1 << 20]


def test_fsync_dir_accepts_a_directory_and_refuses_a_missing_one(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "gone")
