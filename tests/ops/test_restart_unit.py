"""systemd/jetfleet-restart-unit, the activation hook that restarts a service through the
root-owned jetfleet-activate@.path unit. systemd is not PID 1 here, so `systemctl` is a
stand-in that answers from files, and the test plays the path unit's part."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "systemd" / "jetfleet-restart-unit"

FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl show -p InvocationID --value UNIT | systemctl is-active UNIT
state=$FAKE_SYSTEMD_STATE
case $1 in
  show) cat "$state/invocation" ;;
  is-active) cat "$state/active"; [ "$(cat "$state/active")" = active ] ;;
  *) exit 1 ;;
esac
"""


def setup(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    bin_dir, state, trigger = tmp_path / "bin", tmp_path / "state", tmp_path / "restart"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "systemctl").write_text(FAKE_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    (state / "invocation").write_text("aaaa\n")
    (state / "active").write_text("active\n")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_SYSTEMD_STATE": str(state),
        "JETFLEET_RESTART_DIR": str(trigger),
    }
    return env, state, trigger


def path_unit(trigger: Path, state: Path, outcome: str) -> threading.Thread:
    """What jetfleet-activate@robot-ai.path + its service do when the trigger changes."""

    def run() -> None:
        deadline = time.monotonic() + 10
        while not (trigger / "robot-ai").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (state / "active").write_text("activating\n")
        time.sleep(0.3)
        (state / "invocation").write_text("bbbb\n")
        (state / "active").write_text(f"{outcome}\n")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def hook(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(HOOK), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_the_hook_returns_once_a_new_instance_of_the_service_is_active(tmp_path: Path) -> None:
    env, state, trigger = setup(tmp_path)
    unit = path_unit(trigger, state, "active")
    done = hook(env, "robot-ai", "10")
    unit.join()
    assert done.returncode == 0, done.stderr
    assert (trigger / "robot-ai").is_file()


def test_a_service_that_fails_after_the_restart_fails_the_hook(tmp_path: Path) -> None:
    env, state, trigger = setup(tmp_path)
    unit = path_unit(trigger, state, "failed")
    done = hook(env, "robot-ai", "10")
    unit.join()
    assert done.returncode == 1
    assert "robot-ai.service failed after the restart" in done.stderr


@pytest.mark.serial  # asserts a wall-clock bound
def test_without_the_path_unit_the_hook_times_out_and_says_what_to_enable(
    tmp_path: Path,
) -> None:
    env, _, _ = setup(tmp_path)
    started = time.monotonic()
    done = hook(env, "robot-ai", "2")
    assert done.returncode == 1
    assert time.monotonic() - started < 10
    assert "systemctl enable --now jetfleet-activate@robot-ai.path" in done.stderr


def test_a_unit_name_with_shell_characters_is_refused(tmp_path: Path) -> None:
    env, _, trigger = setup(tmp_path)
    done = hook(env, "robot-ai;reboot")
    assert done.returncode == 2
    assert "bad unit name" in done.stderr
    assert not trigger.exists() or not os.listdir(trigger)
