"""The narrow interface between the agent's job worker and the engine/gate machinery.

The worker (agent/worker.py) only ever calls what is named here:

    backend = select_backend(config.backend)                  # agent/engines/__init__.py
    check_targets(manifest.targets, hardware)                 # raises TargetMismatchError
    engine_file = cache.get_or_build(backend, model_path, model_sha256, manifest.build)
    result = run_gate(backend, engine_file, active_engine_file_or_None,
                      golden_path, manifest.gate)             # agent/gate/__init__.py
    engine = load_engine(engine_file)                         # picks the backend from the sidecar

An engine file always has a JSON sidecar next to it (`<engine>.json`, see EngineMeta) that
says which backend made it, so the robot's runtime library can load whatever
`models/<name>/current/engine` is without knowing the backend in advance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from protocol.errors import CodedError
from protocol.manifest import BuildOptions

ENGINE_FILENAME = "engine"  # inside a version directory: engine + engine.json


class EngineError(CodedError):
    """Base of engine failures; `code` is a protocol.messages.ReasonCode value."""

    code = "build_failed"


class BuildError(EngineError):
    code = "build_failed"


class UnsupportedError(EngineError):
    """The bundle asks for something this device's backend cannot do (e.g. int8 on TRT 11)."""

    code = "unsupported"


class TargetMismatchError(EngineError):
    """The bundle's targets (device model, minimum TensorRT / JetPack) exclude this device."""

    code = "target_mismatch"


class EngineLoadError(EngineError):
    """An engine file that is missing, corrupt (hash mismatch) or from another backend."""

    code = "build_failed"


class InferenceError(EngineError):
    """Inference refused or failed: missing/unknown input, wrong dtype or shape, backend error."""

    code = "build_failed"


@dataclass(frozen=True)
class EngineMeta:
    """The sidecar `<engine>.json`."""

    backend: str  # "onnxruntime" | "tensorrt"
    backend_version: str
    sha256: str  # of the engine file: checked before every load
    key: str  # the cache key it was built under
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def device_memory_bytes(self) -> int: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str  # "onnxruntime" | "tensorrt"
    version: str

    def build(self, model_path: Path, options: BuildOptions, out_path: Path) -> None:
        """Write an engine for this device to out_path (the caller renames it into place)."""
        ...

    def load(self, engine_path: Path) -> Engine: ...

    def cache_key_parts(self) -> dict[str, str]:
        """Everything about this device/backend that makes an engine differ (GPU, CC, DLA)."""
        ...
