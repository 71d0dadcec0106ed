"""The systemd units: `systemd-analyze verify` clean (scripts/check-units, as CI runs it),
and the properties the agent depends on on a Jetson."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian: systemd) missing"
)


def directives(unit: Path) -> dict[str, list[str]]:
    """Key -> every value it is given (systemd allows repeats), comments dropped."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def check_units(units_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "check-units")],
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "JETFLEET_UNITS_DIR": str(units_dir)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_unit_verifies_clean() -> None:
    done = check_units(UNITS)
    assert done.returncode == 0, done.stderr
    assert "4 unit(s) verified clean" in done.stdout


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("WatchdogSeconds=30", "Unknown key 'WatchdogSeconds'"),  # a warning, exit 0 alone
        ("Restart=sometimes", "Failed to parse service restart specifier"),
        ("ExecStartPre=/opt/nowhere/bin/prepare", "/opt/nowhere/bin/prepare"),
    ],
)
def test_a_broken_unit_fails_the_check_with_systemds_message(
    tmp_path: Path, line: str, expected: str
) -> None:
    for unit in UNITS.glob("*.service"):
        shutil.copy(unit, tmp_path / unit.name)
    for unit in UNITS.glob("*.path"):
        shutil.copy(unit, tmp_path / unit.name)
    agent = tmp_path / "jetfleet-agent.service"
    agent.write_text(agent.read_text().replace("[Service]\n", f"[Service]\n{line}\n", 1))
    done = check_units(tmp_path)
    assert done.returncode == 1
    assert expected in done.stderr
    assert "jetfleet-agent.service" in done.stderr


def test_the_agent_unit_is_a_hardened_notify_service_that_can_still_reach_the_gpu() -> None:
    d = directives(UNITS / "jetfleet-agent.service")
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["30"] and d["Restart"] == ["on-failure"]
    assert d["ExecStart"] == [
        "/opt/jetfleet/venv/bin/jetfleet-agent run --config /etc/jetfleet/agent.toml"
    ]
    assert "network-online.target" in d["After"][0] and d["Wants"] == ["network-online.target"]
    assert d["User"] == ["jetfleet"]
    assert d["ProtectSystem"] == ["strict"] and d["ReadWritePaths"] == ["/var/lib/jetfleet"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectControlGroups"):  # fmt: skip
        assert d[key] == ["yes"], key
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    # The GPU nodes (/dev/nvhost-*, /dev/nvmap, /dev/nvgpu/*) must stay visible and openable:
    # any of these would hide or close them (ProtectClock implies DeviceAllow=char-rtc).
    assert set(d["SupplementaryGroups"][0].split()) == {"video", "render"}
    for closing in ("PrivateDevices", "DeviceAllow", "DevicePolicy", "ProtectClock"):
        assert closing not in d, closing


def test_install_sh_installs_exactly_the_units_that_are_verified() -> None:
    script = (UNITS / "install.sh").read_text()
    for unit in ("jetfleet-agent.service", "jetfleet-activate@.path", "jetfleet-activate@.service"):
        assert unit in script
        assert (UNITS / unit).is_file()
