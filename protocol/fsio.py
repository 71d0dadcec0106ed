"""Durable file writes and file hashes, the one copy every package uses.

An atomic write goes to a temporary file in the same directory (named `.NAME.tmp-XXXX`,
which the engine cache's sweep recognises), is fsynced, renamed over the target, and then
the directory is fsynced: after a crash or power cut a reader finds the old file or the
whole new one, never a part, and the rename itself is not lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
TMP_INFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename, creation or removal inside `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file another writer produced (a build tool, a copy) durable before a rename."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write that replaces `path` atomically when the block ends.

    The temporary file has `mode` from the start (never chmod'ed afterwards), so a
    private key is not readable by others for even a moment. An exception in the block
    removes the temporary file and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_INFIX}")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (see the module docstring)."""
    with atomic_file(path, mode) as f:
        f.write(data)


def sha256_file(path: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    """The lowercase hex SHA-256 of a file, read in 1 MiB chunks (constant memory).

    `on_chunk(bytes_done)` runs after each chunk: a progress report, or a cancel check
    that raises to stop the read.
    """
    h = hashlib.sha256()
    done = 0
    view = memoryview(bytearray(CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
            done += n
            if on_chunk is not None:
                on_chunk(done)
    return h.hexdigest()
