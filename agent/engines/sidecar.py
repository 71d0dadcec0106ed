"""The engine sidecar `<engine>.json` (EngineMeta): written atomically, read strictly.

The sidecar is what lets anything (the gate, the robot's runtime library) load an engine
without knowing which backend made it, and what lets a load refuse a corrupted file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.engines.api import EngineLoadError, EngineMeta
from protocol.fsio import sha256_file, write_atomic

SIDECAR_SUFFIX = ".json"


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def write_plan(path: Path, data: memoryview | bytes) -> None:
    """Write an engine file (the caller renames it into place) and fsync it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_meta(engine_path: Path, meta: EngineMeta) -> Path:
    path = sidecar_path(engine_path)
    write_atomic(path, json.dumps(asdict(meta), indent=2, sort_keys=True).encode())
    return path


def read_meta(engine_path: Path) -> EngineMeta:
    path = sidecar_path(engine_path)
    try:
        raw: Any = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise EngineLoadError(f"engine {engine_path} has no sidecar {path.name}") from e
    except (OSError, ValueError) as e:
        raise EngineLoadError(f"engine sidecar {path} is unreadable: {e}") from e
    if not isinstance(raw, dict):
        raise EngineLoadError(f"engine sidecar {path} is not a JSON object")
    try:
        meta = EngineMeta(
            backend=str(raw["backend"]),
            backend_version=str(raw["backend_version"]),
            sha256=str(raw["sha256"]),
            key=str(raw["key"]),
            extra=dict(raw.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EngineLoadError(f"engine sidecar {path} lacks field {e}") from e
    return meta


def verify_engine_file(engine_path: Path) -> EngineMeta:
    """Read the sidecar and check the engine's sha256 against it (EngineLoadError if not)."""
    meta = read_meta(engine_path)
    try:
        actual = sha256_file(engine_path)
    except FileNotFoundError as e:
        raise EngineLoadError(f"engine file {engine_path} is missing") from e
    if actual != meta.sha256:
        raise EngineLoadError(
            f"engine file {engine_path} is corrupt: sha256 {actual[:12]}… does not match "
            f"its sidecar's {meta.sha256[:12]}…"
        )
    return meta
