"""When a gated job may switch engines: inside a maintenance window, with the busy lock free.

`ActivationHold.check()` is asked again and again by the worker while the job is ON_HOLD
(docs/protocol.md); each answer says whether to switch now, wait (and why: code `window`
or `busy`, with a sentence), or give up waiting (the busy lock held past
`[activation] busy_timeout_s` with `busy_timeout_action = "defer"`: the job ends DEFERRED).

The busy wait counts from `busy_since`, the first time this window's wait found the lock
held; the worker persists it with the ON_HOLD event, so a restart does not start the
count again. A window that closes meanwhile starts the count afresh in the next one.

The clock is the worker's (`clock()`, an aware datetime). Tests of a real agent move it
through `JETFLEET_AGENT_TEST_CLOCK_FILE` (FileClock; test-only, docs/agent.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.busy import BusyLock
from agent.windows import Windows
from protocol.messages import ReasonCode

Clock = Callable[[], datetime]
CLOCK_ENV = "JETFLEET_AGENT_TEST_CLOCK_FILE"


def wall_clock() -> datetime:
    return datetime.now(timezone.utc)


class FileClock:
    """Test-only: the time is the ISO 8601 instant written in a file, running on from the
    moment the file was written (its mtime), so a test moves it by writing a new one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> datetime:
        try:
            st = os.stat(self.path)
            start = datetime.fromisoformat(self.path.read_text().strip())
        except (OSError, ValueError):
            return wall_clock()  # no file yet, or half written: the real time
        if start.tzinfo is None:
            start = start.replace(tzinfo=timezone.utc)
        return start + timedelta(seconds=max(0.0, wall_clock().timestamp() - st.st_mtime))


def clock_from_env() -> Clock:
    path = os.environ.get(CLOCK_ENV)
    return FileClock(Path(path)) if path else wall_clock


@dataclass(frozen=True)
class Verdict:
    """`go`: switch now (the lock is ours unless `forced`); else wait for `code`/`reason`,
    unless `give_up` (the job ends DEFERRED with them)."""

    go: bool
    code: str | None = None
    reason: str = ""
    busy_since: float | None = None  # to persist: when this window's busy wait began
    subject: str = ""  # what the wait is about (the holders, the windows): a change is news
    give_up: bool = False
    forced: bool = False  # past the busy deadline with action "activate": no lock held


class ActivationHold:
    def __init__(
        self,
        windows: Windows,
        lock: BusyLock,
        *,
        busy_timeout_s: float,
        busy_timeout_action: str = "defer",
        clock: Clock = wall_clock,
    ) -> None:
        self.windows = windows
        self.lock = lock
        self.busy_timeout_s = busy_timeout_s
        self.action = busy_timeout_action
        self.clock = clock

    def check(self, busy_since: float | None, *, windows: bool = True) -> Verdict:
        """Whether to switch now. When the answer is go (and not forced), the busy lock is
        held exclusively until release(). `windows=False`: the busy lock only."""
        now = self.clock()
        if windows and not self.windows.open_at(now):
            return self._closed(now)
        if self.lock.try_acquire():
            return Verdict(go=True)
        since = busy_since if busy_since is not None else now.timestamp()
        waited = now.timestamp() - since
        holders = "; ".join(self.lock.holders()) or "a process that did not say"
        if waited < self.busy_timeout_s:
            return Verdict(
                go=False,
                code=ReasonCode.BUSY.value,
                reason=f"the robot is busy (held by {holders}); waiting up to "
                f"{self.busy_timeout_s - waited:.0f}s more for it to let go",
                busy_since=since,
                subject=holders,
            )
        past = f"the robot was still busy after {waited:.0f}s (held by {holders})"
        if self.action == "activate":
            return Verdict(
                go=True,
                code=ReasonCode.BUSY.value,
                reason=f"{past}: activating anyway ([activation] busy_timeout_action)",
                forced=True,
            )
        return Verdict(
            go=False,
            code=ReasonCode.BUSY.value,
            reason=f"{past}; deferred ([activation] busy_timeout_s), the old engine stays active",
            give_up=True,
        )

    def _closed(self, now: datetime) -> Verdict:
        nxt = self.windows.next_open(now)
        when = nxt.isoformat(timespec="minutes") if nxt else "never"
        return Verdict(
            go=False,
            code=ReasonCode.WINDOW.value,
            reason=f"outside the maintenance windows {self.windows.describe()}; the next "
            f"opens {when}",
            subject=when,
        )

    def release(self) -> None:
        self.lock.release()
