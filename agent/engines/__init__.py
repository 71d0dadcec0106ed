"""Engine backends (ONNX Runtime, TensorRT), the engine cache, and loading by sidecar."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

import structlog

from agent.engines.api import (
    Backend,
    BuildError,
    Engine,
    EngineError,
    EngineLoadError,
    EngineMeta,
    InferenceError,
    TargetMismatchError,
    UnsupportedError,
)
from agent.engines.sidecar import verify_engine_file

__all__ = [
    "BACKENDS",
    "Backend",
    "BuildError",
    "Engine",
    "EngineError",
    "EngineLoadError",
    "EngineMeta",
    "InferenceError",
    "TargetMismatchError",
    "UnsupportedError",
    "load_engine",
    "select_backend",
    "tensorrt_available",
]

log = structlog.get_logger(__name__)
BACKENDS = ("auto", "tensorrt", "onnxruntime")


def tensorrt_available() -> bool:
    """True where both TensorRT's Python bindings and pycuda are importable (no import)."""
    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda"))


def _params(cls: Any) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _construct(cls: Any, options: dict[str, Any], *, strict: bool) -> Any:
    from agent.engines.onnxruntime_backend import OnnxRuntimeBackend
    from agent.engines.tensorrt_backend import TensorRTBackend

    # One config may carry both backends' settings (the other backend's are ignored);
    # a name neither backend takes is a typo, and an explicit backend name refuses it.
    known = _params(OnnxRuntimeBackend) | _params(TensorRTBackend)
    unknown = sorted(set(options) - known)
    if unknown and strict:
        raise UnsupportedError(
            f"backend {cls.name!r} has no option(s) {unknown}; backends take {sorted(known)}"
        )
    accepted = _params(cls)
    return cls(**{k: v for k, v in options.items() if k in accepted})


def select_backend(name: str = "auto", **options: Any) -> Backend:
    """The backend named by config (`backend = auto | tensorrt | onnxruntime`).

    `auto` picks TensorRT where it and pycuda are installed (a Jetson), else ONNX Runtime.
    Options of the backend not chosen are ignored, so one config can carry both backends'
    settings, e.g. select_backend(cfg.backend, timing_cache_dir=data_dir / "engines" /
    "timing", intra_op_threads=1). An option neither backend knows is refused when the
    backend is named explicitly (and ignored under `auto`).

    onnxruntime: providers (list of EP names, default CPU), intra_op_threads (1),
                 inter_op_threads (1), trt_ep_cache_dir
    tensorrt:    timing_cache_dir (None: no timing cache kept), device_index (0)
    """
    return _select(name, options, strict=name != "auto")


def _select(name: str, options: dict[str, Any], *, strict: bool) -> Backend:
    if name not in BACKENDS:
        raise UnsupportedError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    backend: Backend | None = None
    if name == "tensorrt" or (name == "auto" and tensorrt_available()):
        from agent.engines.tensorrt_backend import TensorRTBackend

        try:
            backend = _construct(TensorRTBackend, options, strict=strict)
        except UnsupportedError as e:
            if name == "tensorrt":
                raise
            # auto on a device whose TensorRT is unusable (e.g. JetPack 6.0 ships 8.6, or
            # no GPU visible): ONNX Runtime still runs the bundle; say why, once.
            log.warning("tensorrt_unusable_falling_back", reason=e.reason)
    if backend is None:
        from agent.engines.onnxruntime_backend import OnnxRuntimeBackend

        backend = _construct(OnnxRuntimeBackend, options, strict=strict)
    log.debug("backend_selected", requested=name, backend=backend.name, version=backend.version)
    return backend


def load_engine(engine_path: Path, **options: Any) -> Engine:
    """Load an engine by its sidecar, after checking the file's sha256 against it.

    `options` go to the backend the sidecar names; options of the other backend are
    ignored (one runtime config serves ONNX Runtime and TensorRT engines alike).
    Raises EngineLoadError on a missing/corrupt file or sidecar, or a TensorRT engine made
    by another TensorRT version (plans are not portable across versions).
    """
    engine_path = Path(engine_path)
    meta = verify_engine_file(engine_path)
    if meta.backend not in ("tensorrt", "onnxruntime"):
        raise EngineLoadError(f"engine {engine_path} names an unknown backend {meta.backend!r}")
    backend = _select(meta.backend, options, strict=False)
    if meta.backend == "tensorrt" and backend.version != meta.backend_version:
        raise EngineLoadError(
            f"engine {engine_path} was built by TensorRT {meta.backend_version} but this "
            f"device has TensorRT {backend.version}: it must be rebuilt"
        )
    return backend.load(engine_path)
