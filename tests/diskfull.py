"""A real full disk for tests: a small tmpfs mounted on a directory (tests run as root),
and a filler file that takes every free byte of it at the moment a test chooses.

    with small_tmpfs(tmp_path / "db", "8m") as mnt:
        ...                      # start what writes there
        filler = fill(mnt)       # now the disk is full
        filler.unlink()          # and now it is not
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (mount's syntax: "512k", "8m") on `where`; unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        # Lazily: a process under test may still hold a file there.
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a file until the disk holding `directory` has `leave` bytes or fewer free."""
    filler = directory / f".filler-{os.getpid()}"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as f:
        while (free := shutil.disk_usage(directory).free) > leave:
            try:
                f.write(chunk[: max(min(len(chunk), free - leave), 1)])
            except OSError:
                break
    return filler
