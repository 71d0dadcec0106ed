"""`jetfleet` on the base install (what a Jetson gets: no `controller` extra, Python 3.10):
every command starts, and one that needs the extra says so in one line, never a traceback.

Runs the real CLI under the repository's .venv310, which has the base dependencies only.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_PYTHON = REPO / ".venv310" / "bin" / "python"


def _lacks(module: str) -> bool:
    code = f"import importlib.util as u; exit(bool(u.find_spec({module!r})))"
    return subprocess.run([str(BASE_PYTHON), "-c", code], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not BASE_PYTHON.exists() or not (_lacks("prometheus_client") and _lacks("matplotlib")),
    reason="needs .venv310 with the base install only (no controller extra)",
)


def jetfleet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "JETFLEET_DB": str(tmp_path / "controller.db"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [str(BASE_PYTHON), "-c", "from controller.cli.main import app; app()", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_and_a_plain_command_work_without_the_controller_extra(tmp_path: Path) -> None:
    help_ = jetfleet(tmp_path, "--help")
    assert help_.returncode == 0, help_.stderr
    assert "serve" in help_.stdout and "Traceback" not in help_.stderr
    keys = jetfleet(tmp_path, "keys", "init", str(tmp_path / "keys"))
    assert keys.returncode == 0, keys.stderr
    assert (tmp_path / "keys" / "trust.json").is_file()


@pytest.mark.parametrize(
    ("args", "module"),
    [
        (("serve",), "prometheus_client"),
        (("telemetry", "plot", "--device", "robot-1", "--metric", "gpu_util", "--out", "p.png"),
         "matplotlib"),
    ],
)  # fmt: skip
def test_a_command_that_needs_the_extra_says_so_in_one_line(
    tmp_path: Path, args: tuple[str, ...], module: str
) -> None:
    out = jetfleet(tmp_path, *args)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert module in line and "pip install 'jetfleet[controller]'" in line
