"""The state file of a running `jetfleet serve`: where it hosts bundles, for `rollout start`.

`data_dir/serve.json` = {"bundle_url_base", "metrics_url", "pid"}, written atomically at
start and removed at exit; it sits next to serve's --db, so a command with another --db
does not find it (and says so).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from protocol.fsio import write_atomic

SERVE_STATE = "serve.json"


@dataclass(frozen=True)
class ServeState:
    bundle_url_base: str  # e.g. http://host:8380/bundles ; a bundle is base + "/" + file
    metrics_url: str
    pid: int

    def bundle_url(self, filename: str) -> str:
        return f"{self.bundle_url_base}/{filename}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def write_serve_state(data_dir: Path, state: ServeState) -> Path:
    """tmp + fsync + rename: a reader sees the old file or the new one, never half."""
    path = data_dir / SERVE_STATE
    write_atomic(path, json.dumps(state.__dict__).encode())
    return path


def find_serve_state(data_dir: Path) -> tuple[ServeState | None, str]:
    """The running server's state (None when there is none or its process is gone), and
    why it was or was not found, for the operator."""
    path = Path(data_dir) / SERVE_STATE
    try:
        data = json.loads(path.read_text())
        state = ServeState(
            str(data["bundle_url_base"]), str(data.get("metrics_url", "")), int(data["pid"])
        )
    except FileNotFoundError:
        return None, f"no `jetfleet serve` state file at {path} (serve writes it next to its --db)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable `jetfleet serve` state file {path} ({e})"
    if not _pid_alive(state.pid):
        return None, f"{path} names process {state.pid}, which is no longer running"
    return state, f"from the running `jetfleet serve` (pid {state.pid}, {path})"


def read_serve_state(data_dir: Path) -> ServeState | None:
    """The running server's state, or None when there is none or its process is gone."""
    return find_serve_state(data_dir)[0]


def remove_serve_state(data_dir: Path, pid: int | None = None) -> None:
    """Remove the state file if it is ours (a newer server may have replaced it)."""
    path = Path(data_dir) / SERVE_STATE
    try:
        if pid is not None and json.loads(path.read_text()).get("pid") != pid:
            return
        path.unlink()
    except (OSError, ValueError):
        pass
