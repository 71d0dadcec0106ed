"""systemd/install.sh into a staging prefix: real venv, real pip, real files, modes, owners."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "systemd" / "install.sh"

if os.geteuid() == 0:
    USER, GROUP, ROOT = "nobody", "nogroup", "root"
else:  # a non-root run owns what it installs
    USER = ROOT = pwd.getpwuid(os.geteuid()).pw_name
    GROUP = grp.getgrgid(os.getegid()).gr_name


# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = pytest.mark.xdist_group("test_install")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jetfleet wheel built from a copy of this checkout (so no build/ lands in the tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("protocol", "agent", "controller"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("jetfleet-*.whl")
    return whl


@dataclass
class Installer:
    root: Path
    inputs: Path
    wheel: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            "bash",
            str(INSTALL),
            "--prefix",
            str(self.root),
            "--no-systemctl",
            "--no-useradd",
            "--user",
            USER,
            "--group",
            GROUP,
            *args,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"install.sh failed ({done.returncode}):\n{done.stderr}")
        return done

    def install(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(
            "--device-id",
            "robot-0042",
            "--groups",
            "warehouse-a,canary",
            "--trust",
            str(self.inputs / "trust.json"),
            "--broker",
            "mqtts://broker.lan:8883",
            "--ca",
            str(self.inputs / "ca.pem"),
            "--cert",
            str(self.inputs / "robot.pem"),
            "--key",
            str(self.inputs / "robot.key"),
            "--from",
            str(self.wheel),
            "--python",
            sys.executable,
            "--pip-args",
            "--no-deps",
            *extra,
            check=check,
        )

    def p(self, path: str) -> Path:
        return self.root / path.lstrip("/")


def make_installer(base: Path, wheel: Path, trust_material: Any) -> Installer:
    inputs = base / "inputs"
    inputs.mkdir()
    trust_material.write(inputs / "trust.json")
    for name in ("ca.pem", "robot.pem", "robot.key"):
        (inputs / name).write_text(f"-----BEGIN TEST {name}-----\n")
    return Installer(base / "root", inputs, wheel)


@pytest.fixture
def installer(tmp_path: Path, wheel: Path, trust_material: Any) -> Iterator[Installer]:
    yield make_installer(tmp_path, wheel, trust_material)


@pytest.fixture(scope="module")
def installed(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, trust_material: Any
) -> Installer:
    """One installation that the read-only tests below look at."""
    inst = make_installer(tmp_path_factory.mktemp("installed"), wheel, trust_material)
    inst.install("--activation-unit", "robot-ai.service")
    return inst


def mode_owner(path: Path) -> tuple[str, str, str]:
    st = path.lstat()
    return (
        oct(stat.S_IMODE(st.st_mode)),
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
    )


def snapshot(root: Path) -> dict[str, tuple[float, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_mtime, p.lstat().st_mode)
        for p in root.rglob("*")
        if "/venv/" not in str(p)
    }


def test_install_lays_out_user_owned_data_and_root_owned_config_with_the_right_modes(
    installed: Installer,
) -> None:
    assert mode_owner(installed.p("/var/lib/jetfleet")) == ("0o750", USER, GROUP)
    assert mode_owner(installed.p("/etc/jetfleet")) == ("0o750", ROOT, GROUP)
    assert mode_owner(installed.p("/etc/jetfleet/agent.toml")) == ("0o640", ROOT, GROUP)
    assert mode_owner(installed.p("/etc/jetfleet/trust.json")) == ("0o644", ROOT, GROUP)
    assert mode_owner(installed.p("/etc/jetfleet/tls/client.key")) == ("0o640", ROOT, GROUP)
    assert (
        installed.p("/etc/jetfleet/trust.json").read_bytes()
        == (installed.inputs / "trust.json").read_bytes()
    )
    for unit in ("jetfleet-agent.service", "jetfleet-activate@.path", "jetfleet-activate@.service"):
        copy = installed.p(f"/etc/systemd/system/{unit}")
        assert copy.read_bytes() == (REPO / "systemd" / unit).read_bytes()
        assert mode_owner(copy)[0] == "0o644"
    assert mode_owner(installed.p("/opt/jetfleet/bin/jetfleet-restart-unit"))[0] == "0o755"


def test_the_venv_sees_system_packages_and_exposes_jetfleet_agent(installed: Installer) -> None:
    venv = installed.p("/opt/jetfleet/venv")
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    assert os.access(venv / "bin" / "jetfleet-agent", os.X_OK)
    link = installed.p("/usr/local/bin/jetfleet-agent")
    assert os.readlink(link) == "/opt/jetfleet/venv/bin/jetfleet-agent"
    # The package really is installed in the venv (sdnotify needs only the stdlib).
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import agent.sdnotify, protocol; print('ok')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_the_written_config_is_accepted_by_the_agent_and_names_the_final_paths(
    installed: Installer,
) -> None:
    config = load_config(installed.p("/etc/jetfleet/agent.toml"))
    assert config.device_id == "robot-0042"
    assert config.groups == ["warehouse-a", "canary"]
    assert config.data_dir == Path("/var/lib/jetfleet")
    assert config.trust_root == Path("/etc/jetfleet/trust.json")
    assert config.broker.url == "mqtts://broker.lan:8883"
    assert config.broker.ca == "/etc/jetfleet/tls/ca.pem"
    assert config.broker.key == "/etc/jetfleet/tls/client.key"
    assert config.activation.hook == "/opt/jetfleet/bin/jetfleet-restart-unit robot-ai"


def test_a_rerun_with_the_same_arguments_changes_nothing_and_says_so(
    installer: Installer,
) -> None:
    installer.install()
    before = snapshot(installer.root)
    again = installer.install()
    assert "nothing to change" in again.stdout
    assert snapshot(installer.root) == before


def test_a_rerun_with_another_broker_rewrites_the_config_and_keeps_the_old_one(
    installer: Installer,
) -> None:
    installer.install()
    first = installer.p("/etc/jetfleet/agent.toml").read_text()
    args = ["--broker", "mqtt://other.lan:1883"]
    done = installer.install(*args)
    assert "wrote /etc/jetfleet/agent.toml" in done.stdout
    assert load_config(installer.p("/etc/jetfleet/agent.toml")).broker.url == (
        "mqtt://other.lan:1883"
    )
    (backup,) = installer.p("/etc/jetfleet").glob("agent.toml.bak-*")
    assert backup.read_text() == first
    assert "installed jetfleet" not in done.stdout  # the same wheel is not reinstalled


def test_uninstall_keeps_the_data_directory_and_purge_removes_it(installer: Installer) -> None:
    installer.install()
    engine = installer.p("/var/lib/jetfleet/engines/abc")
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"engine")
    done = installer.run("--uninstall")
    assert "kept /var/lib/jetfleet" in done.stdout
    assert engine.read_bytes() == b"engine"
    for gone in ("/opt/jetfleet", "/etc/jetfleet", "/usr/local/bin/jetfleet-agent"):
        assert not os.path.lexists(installer.p(gone)), gone
    assert not installer.p("/etc/systemd/system/jetfleet-agent.service").exists()
    assert "nothing to remove" in installer.run("--uninstall").stdout
    installer.run("--uninstall", "--purge")
    assert not installer.p("/var/lib/jetfleet").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device-id", "Robot 42"], "device id 'Robot 42' must match"),
        (["--groups", "ok,Bad!"], "group 'Bad!' must match"),
        (["--broker", "http://broker:80"], "must be mqtt://HOST[:PORT]"),
        (["--backend", "cuda"], "--backend must be auto, tensorrt or onnxruntime"),
        (["--activation-unit", "robot ai; rm -rf /"], "is not a unit name"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason_and_nothing_is_installed(
    installer: Installer, args: list[str], message: str
) -> None:
    done = installer.install(*args, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert not installer.p("/etc/jetfleet").exists()


def test_a_file_that_is_not_a_signed_trust_root_is_refused(installer: Installer) -> None:
    (installer.inputs / "trust.json").write_text('{"keys": {}}')
    done = installer.install(check=False)
    assert done.returncode == 2
    assert "is not a signed jetfleet trust root" in done.stderr
