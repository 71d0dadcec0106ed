"""Engine backends (ONNX Runtime, TensorRT), the engine cache, and loading by sidecar."""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
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
    "BackendChoice",
    "BuildError",
    "Engine",
    "EngineError",
    "EngineLoadError",
    "EngineMeta",
    "InferenceError",
    "TargetMismatchError",
    "UnsupportedError",
    "choose_backend",
    "load_engine",
    "select_backend",
    "tensorrt_available",
]

log = structlog.get_logger(__name__)
BACKENDS = ("auto", "tensorrt", "onnxruntime")


def tensorrt_available() -> bool:
    """True where both TensorRT's Python bindings and pycuda are importable (no import)."""
    return _tensorrt_missing() is None


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


@dataclass(frozen=True)
class BackendChoice:
    backend: Backend
    fallback: str | None  # why `auto` did not get TensorRT on a Jetson; None: no fallback


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
    return choose_backend(name, **options).backend


def choose_backend(
    name: str = "auto", *, allow_cpu_fallback: bool = True, **options: Any
) -> BackendChoice:
    """select_backend, also saying why `auto` fell back from TensorRT to ONNX Runtime on the
    CPU (10-50x slower). The fallback is a loud warning; with allow_cpu_fallback=False it
    is an UnsupportedError instead."""
    if name not in BACKENDS:
        raise UnsupportedError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    strict = name != "auto"
    fallback: str | None = None
    if name == "tensorrt":
        return BackendChoice(_tensorrt(options, strict=True), None)
    if name == "auto":
        fallback = _tensorrt_missing()
        if fallback is None:
            try:
                return BackendChoice(_tensorrt(options, strict=False), None)
            except UnsupportedError as e:  # e.g. JetPack 6.0's TensorRT 8.6, no GPU visible
                fallback = e.reason
    if fallback is not None and (_on_jetson() or _importable("tensorrt")):
        if not allow_cpu_fallback:
            raise UnsupportedError(
                f"the agent config refuses a CPU fallback (allow_cpu_fallback = false) and "
                f"TensorRT cannot run here: {fallback}"
            )
        log.warning("tensorrt_unusable_falling_back_to_cpu", reason=fallback,
                    backend="onnxruntime", slower="10-50x")  # fmt: skip
    else:
        fallback = None  # a PC without TensorRT: ONNX Runtime is the expected backend
    from agent.engines.onnxruntime_backend import OnnxRuntimeBackend

    backend = _construct(OnnxRuntimeBackend, options, strict=strict)
    log.debug("backend_selected", requested=name, backend=backend.name, version=backend.version)
    return BackendChoice(backend, fallback)


def _tensorrt(options: dict[str, Any], *, strict: bool) -> Backend:
    from agent.engines.tensorrt_backend import TensorRTBackend

    backend: Backend = _construct(TensorRTBackend, options, strict=strict)
    return backend


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").is_file()


def _tensorrt_missing() -> str | None:
    """Why TensorRT cannot even be tried (a missing module), else None."""
    if not _importable("tensorrt"):
        return (
            "the tensorrt Python module is not installed: JetPack's python3-libnvinfer, and "
            "the agent's venv needs --system-site-packages"
        )
    if not _importable("pycuda"):
        return (
            "pycuda is not installed: it builds from source on JetPack 6 and needs nvcc, "
            "PATH=/usr/local/cuda/bin:$PATH pip install pycuda in the agent's venv"
        )
    return None


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
    if meta.backend == "tensorrt":
        backend = _tensorrt(options, strict=False)
    else:
        from agent.engines.onnxruntime_backend import OnnxRuntimeBackend

        backend = _construct(OnnxRuntimeBackend, options, strict=False)
    if meta.backend == "tensorrt" and backend.version != meta.backend_version:
        raise EngineLoadError(
            f"engine {engine_path} was built by TensorRT {meta.backend_version} but this "
            f"device has TensorRT {backend.version}: it must be rebuilt"
        )
    return backend.load(engine_path)
