"""Controller settings: CLI options > environment > ~/.config/jetfleet/config.toml > defaults.

`--broker` (JETFLEET_BROKER), `--keys` (JETFLEET_KEYS), `--db` (JETFLEET_DB), and the agent's
TLS keys (`ca`, `cert`, `key`); the config file uses the same key names (docs/operations.md).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the base install on a Jetson (Python 3.10) has tomli instead
    import tomli as tomllib

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jetfleet" / "config.toml"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "jetfleet"


class SettingsError(ValueError):
    """A config file or value the controller cannot use; the message names the key."""


@dataclass
class ControllerSettings:
    broker: str = DEFAULT_BROKER
    keys: Path | None = None
    db: Path = field(default_factory=lambda: default_data_dir() / "controller.db")
    ca: str = ""
    cert: str = ""
    key: str = ""
    protocol: str = "5"
    prefix: str = "jetfleet/v1"
    bundle_dir: Path = field(default_factory=lambda: default_data_dir() / "bundles")

    @classmethod
    def load(
        cls, overrides: dict[str, Any] | None = None, config: Path | None = None
    ) -> ControllerSettings:
        values: dict[str, Any] = {}
        path = config or Path(os.environ.get("JETFLEET_CONFIG", default_config_path()))
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise SettingsError(f"{path}: not valid TOML ({e})") from e
            known = {f.name for f in fields(cls)}
            flat = (
                {**data, **data.get("broker", {})} if isinstance(data.get("broker"), dict) else data
            )
            if isinstance(data.get("broker"), dict):
                flat["broker"] = data["broker"].get("url", DEFAULT_BROKER)
            for k, v in flat.items():
                if k in known:
                    values[k] = v
        for name, env in (
            ("broker", "JETFLEET_BROKER"),
            ("keys", "JETFLEET_KEYS"),
            ("db", "JETFLEET_DB"),
        ):
            if os.environ.get(env):
                values[name] = os.environ[env]
        for k, v in (overrides or {}).items():
            if v is not None and v != "":
                values[k] = v
        s = cls(**values)
        s.keys = Path(s.keys).expanduser() if s.keys else None
        s.db = Path(s.db).expanduser()
        s.bundle_dir = Path(s.bundle_dir).expanduser()
        s.protocol = str(s.protocol)
        if s.protocol not in ("5", "3.1.1"):
            raise SettingsError(f"protocol must be 5 or 3.1.1, not {s.protocol!r}")
        return s
