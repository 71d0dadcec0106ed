"""A private PostgreSQL server for tests, from the Debian packages' binaries.

`initdb` into a fresh directory, then `postgres` on a free loopback port with its unix
socket in that directory, trust authentication, and durability off (fsync,
synchronous_commit, full_page_writes: a test cluster is thrown away, never recovered).
Each test gets a database of its own (`create_database`), dropped afterwards.

PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user the
Debian package creates, so its directory lives outside pytest's root-only tmp tree.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from controller.sandbox.localbroker import free_port

USER = "jetfleet"


def postgres_bin() -> Path | None:
    """The directory of the newest installed server binaries (initdb, postgres)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL server cannot run here, or None if it can."""
    if postgres_bin() is None:
        return (
            "PostgreSQL is not installed (apt-get install postgresql; bash scripts/setup does it)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgresql]')"
    if os.geteuid() == 0 and _run_as() is None:
        return "running as root and there is no `postgres` user to run the server as"
    return None


def _run_as() -> str | None:
    """The user the server runs as: None for ourselves, `postgres` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return None


class LocalPostgres:
    """One server; `url(dbname)` for a database on it, `create_database()` for a new one."""

    def __init__(self) -> None:
        binaries = postgres_bin()
        assert binaries is not None, postgres_missing()
        self.bin = binaries
        self.user = _run_as() if os.geteuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="jetfleet-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*args], user=self.user, check=True, capture_output=True, timeout=120, **kw
        )

    def start(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        )
        with (self.dir / "postgres.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.dir),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "shared_buffers=32MB",
                ],
                user=self.user,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start: {self.log_tail()}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log_tail()}") from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "postgres.log").read_text(errors="replace")[-2000:]
        return ""

    def url(self, dbname: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        # FILE_COPY: a copy of template0's files, no WAL for it (fsync is off anyway).
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT: fast shutdown, which disconnects clients a test left behind.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
