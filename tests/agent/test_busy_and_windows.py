"""Building blocks of robot-aware activation: the busy lock (real flock) and windows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.busy import BusyLock, busy
from agent.windows import WindowError, Windows

BERLIN = ZoneInfo("Europe/Berlin")


def test_a_holder_blocks_the_agent_and_is_named_until_it_lets_go(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "busy.lock"
    agent = BusyLock(lock)
    with busy(lock, "mission 42"):
        assert not agent.try_acquire()
        assert any(h.endswith(": mission 42") and f"pid {os.getpid()}" in h
                   for h in agent.holders())  # fmt: skip
    assert agent.try_acquire()
    agent.release()


def test_a_holder_killed_by_sigkill_blocks_nothing(tmp_path: Path) -> None:
    lock = tmp_path / "busy.lock"
    code = f"from agent.busy import busy\nwith busy({str(lock)!r}, 'x'):\n    input()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    agent = BusyLock(lock)
    deadline = time.monotonic() + 20
    while agent.try_acquire():  # until the holder has it
        agent.release()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    deadline = time.monotonic() + 20
    while not agent.try_acquire():
        assert time.monotonic() < deadline, agent.holders()
        time.sleep(0.05)
    agent.release()


def test_an_overnight_window_runs_into_the_next_morning() -> None:
    w = Windows(["Mon-Fri 22:00-06:00"], "Europe/Berlin")
    assert not w.open_at(datetime(2026, 12, 7, 12, 0, tzinfo=BERLIN))  # Monday noon
    assert w.open_at(datetime(2026, 12, 7, 23, 0, tzinfo=BERLIN))
    assert w.open_at(datetime(2026, 12, 12, 5, 59, tzinfo=BERLIN))  # Sat, from Friday
    assert not w.open_at(datetime(2026, 12, 13, 5, 0, tzinfo=BERLIN))  # Sun: Sat has none
    # Saturday noon: the next one opens Monday 22:00 Berlin time.
    nxt = w.next_open(datetime(2026, 12, 12, 12, 0, tzinfo=BERLIN))
    assert nxt == datetime(2026, 12, 14, 22, 0, tzinfo=BERLIN)


def test_no_windows_means_always_open_and_bad_specs_are_one_line_errors() -> None:
    assert Windows([]).open_at(datetime(2026, 12, 7, tzinfo=BERLIN))
    with pytest.raises(WindowError, match="not 'DAYS HH:MM-HH:MM'"):
        Windows(["weekdays at night"])
    with pytest.raises(WindowError, match="unknown day"):
        Windows(["Mon-Fry 22:00-06:00"])
    with pytest.raises(WindowError, match="unknown time zone"):
        Windows(["daily 01:00-02:00"], "Mars/Olympus")


def test_the_hold_waits_for_the_window_then_the_lock_and_its_deadline_decides(
    tmp_path: Path,
) -> None:
    from datetime import timedelta

    from agent.hold import ActivationHold

    now = [datetime(2026, 12, 7, 12, 0, tzinfo=BERLIN)]  # Monday noon
    lock = tmp_path / "busy.lock"

    def hold(action: str) -> ActivationHold:
        return ActivationHold(Windows(["Mon 22:00-23:00"], "Europe/Berlin"), BusyLock(lock),
                              busy_timeout_s=60, busy_timeout_action=action,
                              clock=lambda: now[0])  # fmt: skip

    h = hold("defer")
    v = h.check(None)
    assert (v.go, v.code) == (False, "window") and "2026-12-07T22:00+01:00" in v.reason
    now[0] = datetime(2026, 12, 7, 22, 0, tzinfo=BERLIN)
    with busy(lock, "mission 7"):
        v = h.check(None)
        assert (v.go, v.code, v.give_up) == (False, "busy", False) and "mission 7" in v.reason
        since = v.busy_since
        now[0] += timedelta(seconds=61)
        v = h.check(since)
        assert v.give_up and "still busy after 61s" in v.reason
        v = hold("activate").check(since)
        assert v.go and v.forced and "activating anyway" in v.reason
    v = h.check(since)
    assert v.go and not v.forced  # free: the agent now holds the lock exclusively
    assert not BusyLock(lock).try_acquire()
    h.release()
    assert h.check(None, windows=False).go  # an offline install ignores the window
    h.release()


def test_a_bad_window_in_agent_toml_is_a_one_line_config_error(tmp_path: Path) -> None:
    from agent.config import ConfigError, load_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "r1"\n[activation]\nwindows = ["Mon-Fry 22:00-06:00"]\n')
    with pytest.raises(ConfigError, match=r"config key activation in .*unknown day 'mon-fry'"):
        load_config(cfg)
    cfg.write_text('device_id = "r1"\n[activation]\nbusy_timeout_action = "wait"\n')
    with pytest.raises(ConfigError, match=r"activation\.busy_timeout_action"):
        load_config(cfg)
