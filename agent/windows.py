"""Maintenance windows: when a robot may switch engines (`[activation] windows`).

    windows = ["Mon-Fri 22:00-06:00", "Sat,Sun 00:00-24:00"]
    timezone = "Europe/Berlin"           # empty: the device's local time zone

A window starts on each listed day at its start time, in the robot's time zone, and
ends at its end time, the next day when the end is not after the start (22:00-06:00
on Fri runs into Saturday morning). Days: Mon..Sun, a range (Mon-Fri, Fri-Mon), a list
(Mon,Wed), or "daily". No windows: activation is always allowed. Download, build and
gate never wait for a window; only the switch does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from protocol.errors import CodedError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPEC = re.compile(r"^\s*(\S+)\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class WindowError(CodedError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, code="invalid_config")


def _days(text: str) -> frozenset[int]:
    if text.lower() == "daily":
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.lower().split(","):
        ends = part.split("-")
        if len(ends) > 2 or any(e not in DAYS for e in ends):
            raise WindowError(f"unknown day {part!r} (Mon..Sun, a range Mon-Fri, or daily)")
        first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
        out.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(out)


def _clock(h: str, m: str, spec: str) -> int:
    minutes = int(h) * 60 + int(m)
    if int(m) > 59 or minutes > 24 * 60:
        raise WindowError(f"bad time in window {spec!r}")
    return minutes


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # weekday the window starts on (Monday 0)
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start: the next day

    @classmethod
    def parse(cls, spec: str) -> Window:
        m = _SPEC.match(spec)
        if m is None:
            raise WindowError(
                f"window {spec!r} is not 'DAYS HH:MM-HH:MM' (e.g. Mon-Fri 22:00-06:00)"
            )
        start, end = _clock(m[2], m[3], spec), _clock(m[4], m[5], spec)
        if start == 24 * 60:
            raise WindowError(f"window {spec!r} starts at 24:00")
        return cls(_days(m[1]), start, end)

    def length(self) -> timedelta:
        return timedelta(minutes=(self.end - self.start) % (24 * 60) or 24 * 60)

    def opening(self, day: datetime) -> datetime:
        """This window's start on `day`'s date (aware, in day's zone)."""
        midnight = datetime.combine(day.date(), time(0), day.tzinfo)
        return midnight + timedelta(minutes=self.start)


class Windows:
    """The device's windows in its time zone; pure: the clock is the caller's."""

    def __init__(self, specs: list[str], zone: str = "") -> None:
        self.specs = list(specs)
        self.windows = [Window.parse(s) for s in specs]
        try:
            self.zone: tzinfo | None = ZoneInfo(zone) if zone else None
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise WindowError(f"unknown time zone {zone!r}: {e}") from e

    def _local(self, now: datetime) -> datetime:
        return now.astimezone(self.zone) if self.zone else now.astimezone()

    def open_at(self, now: datetime) -> bool:
        """Whether `now` (aware) falls inside a window; always True without windows."""
        if not self.windows:
            return True
        local = self._local(now)
        for w in self.windows:
            for back in (0, 1):  # a window that started yesterday may still run
                day = local - timedelta(days=back)
                if day.weekday() in w.days:
                    start = w.opening(day)
                    if start <= local < start + w.length():
                        return True
        return False

    def next_open(self, now: datetime) -> datetime | None:
        """When the next window opens after `now` (None without windows or when open)."""
        if not self.windows or self.open_at(now):
            return None
        local = self._local(now)
        starts = [
            w.opening(local + timedelta(days=ahead))
            for ahead in range(8)
            for w in self.windows
            if (local + timedelta(days=ahead)).weekday() in w.days
        ]
        return min(s for s in starts if s > local)

    def describe(self) -> str:
        zone = str(self.zone) if self.zone else "local time"
        return f"{', '.join(self.specs)} ({zone})"
