"""Controller settings: CLI options > environment > the context > ~/.config/jetfleet/config.toml
> defaults.

`--broker` (JETFLEET_BROKER), `--keys` (JETFLEET_KEYS), `--db` (JETFLEET_DB), and
the agent's TLS keys (`ca`, `cert`, `key`); the config file uses the same key names
(docs/operations.md).

Named contexts (one per fleet, as kubectl's): `[contexts.NAME]` tables of the config file
with the same keys. The one in use is `--context` (JETFLEET_CONTEXT), else the one
`jetfleet context use` wrote to `current-context` beside the config file. A context's
database defaults to DATA_DIR/contexts/NAME/controller.db, and the bundle directory is
bundles/ beside the database, so no two fleets share state.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from controller.db import DatabaseError, is_url, sqlite_path
from protocol.errors import CodedError

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


class SettingsError(CodedError, ValueError):
    """A config file or value the controller cannot use; the message names the key."""

    code = "settings"


CURRENT_CONTEXT_FILE = "current-context"
_CONTEXT_KEYS = (
    "broker",
    "keys",
    "db",
    "ca",
    "cert",
    "key",
    "protocol",
    "prefix",
    "bundle_dir",
    "console_token",
)


def config_path(config: Path | None = None) -> Path:
    return config or Path(os.environ.get("JETFLEET_CONFIG", default_config_path()))


def current_context_path(config: Path) -> Path:
    return config.parent / CURRENT_CONTEXT_FILE


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: not valid TOML ({e})") from e


def contexts(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    table = data.get("contexts", {})
    return (
        {k: v for k, v in table.items() if isinstance(v, dict)} if isinstance(table, dict) else {}
    )


def context_values(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The settings of context `name`, with its own database and bundle directory."""
    known = contexts(data)
    if name not in known:
        raise SettingsError(
            f"no context {name!r} in {path} (contexts: {', '.join(sorted(known)) or 'none'}; "
            f"add a [contexts.{name}] table)"
        )
    unknown = sorted(set(known[name]) - set(_CONTEXT_KEYS))
    if unknown:
        raise SettingsError(
            f"{path}: [contexts.{name}] has unknown key(s) {', '.join(unknown)}; "
            f"keys are {', '.join(_CONTEXT_KEYS)}"
        )
    return {"db": default_data_dir() / "contexts" / name / "controller.db", **known[name]}


def current_context(path: Path) -> str | None:
    try:
        return current_context_path(path).read_text().strip() or None
    except OSError:
        return None


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
    bundle_dir: Path = Path()  # unset: bundles/ beside the database (state per database)
    # `serve`'s console token (JETFLEET_CONSOLE_TOKEN and --token win); a secret: no repr.
    console_token: str = field(default="", repr=False)
    context: str | None = None  # the named context in use
    # --db as a server URL (postgresql://…): the database; `db` then only places the
    # local files (bundles/, rollouts/ logs) in the data directory.
    database: str = ""

    def db_target(self) -> str | Path:
        """What the stores open: the PostgreSQL URL, or the SQLite file."""
        return self.database or self.db

    @classmethod
    def load(
        cls,
        overrides: dict[str, Any] | None = None,
        config: Path | None = None,
        context: str | None = None,
    ) -> ControllerSettings:
        values: dict[str, Any] = {}
        path = config_path(config)
        data = read_config(path)
        if data:
            known = {f.name for f in fields(cls)} - {"context", "database"}
            flat = (
                {**data, **data.get("broker", {})} if isinstance(data.get("broker"), dict) else data
            )
            if isinstance(data.get("broker"), dict):
                flat["broker"] = data["broker"].get("url", DEFAULT_BROKER)
            for k, v in flat.items():
                if k in known:
                    values[k] = v
        name = context or os.environ.get("JETFLEET_CONTEXT") or current_context(path)
        if name:
            values.update(context_values(data, name, path))
        for name_, env in (
            ("broker", "JETFLEET_BROKER"),
            ("keys", "JETFLEET_KEYS"),
            ("db", "JETFLEET_DB"),
            ("console_token", "JETFLEET_CONSOLE_TOKEN"),
        ):
            if os.environ.get(env):
                values[name_] = os.environ[env]
        for k, v in (overrides or {}).items():
            if v is not None and v != "":
                values[k] = v
        s = cls(**values, context=name)
        s.keys = Path(s.keys).expanduser() if s.keys else None
        if is_url(s.db):
            s.database, s.db = str(s.db), default_data_dir() / "controller.db"
        else:
            try:
                s.db = sqlite_path(s.db) or Path(s.db)
            except DatabaseError as e:
                raise SettingsError(e.reason) from None
        given = values.get("bundle_dir")
        s.bundle_dir = Path(given).expanduser() if given else s.db.parent / "bundles"
        s.protocol = str(s.protocol)
        if s.protocol not in ("5", "3.1.1"):
            raise SettingsError(f"protocol must be 5 or 3.1.1, not {s.protocol!r}")
        return s
