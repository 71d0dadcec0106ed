"""The busy lock: the robot's own software says "on a mission, do not swap models now".

A holder takes a shared flock(2) on one lock file (default data_dir/run/busy.lock,
`[activation] busy_lock`), through the runtime library

    with rt.busy("mission 42"):            # agent.runtime.ModelRuntime.busy
        ...
    hold = rt.busy("mission 43").acquire() # or across callbacks: ... hold.release()

or from any program or shell, with no jetfleet code at all:

    flock --shared /var/lib/jetfleet/run/busy.lock  run-mission.sh

Before it switches engines the agent takes the same lock exclusively, without blocking:
while anyone holds it shared, activation waits (job state ON_HOLD, code `busy`). The
kernel drops a flock when its holder's last descriptor closes, so a holder that died
(even by kill -9) blocks nothing. The agent keeps its exclusive lock through the switch,
hook, acknowledgement and health check: a mission that starts then waits those seconds.

Who holds the lock is read from /proc/locks (pid and command name); a holder through
`busy()` also leaves its reason in <lock>.why/<pid>, which the agent shows in the event.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

# Lock and reason files are written by the robot's services, which may run as other users.
_MODE = 0o666


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _MODE)
    with contextlib.suppress(OSError):
        os.fchmod(fd, _MODE)  # the umask narrowed it; best effort when another user owns it
    return fd


def _why_dir(path: Path) -> Path:
    return path.with_name(path.name + ".why")


class BusyHold:
    """One holder's share of the busy lock: a context manager, or acquire()/release()
    for a mission that does not fit one block."""

    def __init__(self, path: Path | str, reason: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        self._fd: int | None = None
        self._why: Path | None = None

    def acquire(self) -> BusyHold:
        if self._fd is not None:
            return self
        fd = _open(self.path)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while the agent is mid-switch (seconds)
        self._fd = fd
        if self.reason:
            why = _why_dir(self.path) / str(os.getpid())
            with contextlib.suppress(OSError):
                why.parent.mkdir(exist_ok=True)
                why.write_text(self.reason[:200])
                self._why = why
        return self

    def release(self) -> None:
        if self._why is not None:
            with contextlib.suppress(OSError):
                self._why.unlink(missing_ok=True)
            self._why = None
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> BusyHold:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def busy(path: Path | str, reason: str = "") -> BusyHold:
    """Hold the busy lock (shared with other holders) for a `with` block's duration."""
    return BusyHold(path, reason)


class BusyLock:
    """The agent's side: take the lock exclusively when nobody is busy, say who is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock exclusively when no one holds it; held until release()."""
        if self._fd is not None:
            return True
        fd = _open(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holders(self) -> list[str]:
        """'pid 123 (mission-ctl): mission 42' for each holder /proc/locks names."""
        try:
            ino = os.stat(self.path).st_ino
            lines = Path("/proc/locks").read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            parts = line.split()
            # "1: FLOCK  ADVISORY  READ  1234 08:02:5678 0 EOF" (blocked waiters: "->")
            if len(parts) < 6 or parts[1] != "FLOCK" or parts[0] == "->":
                continue
            if parts[5].rsplit(":", 1)[-1] != str(ino) or not parts[4].isdigit():
                continue
            out.append(self._describe(int(parts[4])))
        return out

    def _describe(self, pid: int) -> str:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            comm = "?"
        try:
            why = (_why_dir(self.path) / str(pid)).read_text().strip()
        except OSError:
            why = ""
        return f"pid {pid} ({comm})" + (f": {why}" if why else "")
