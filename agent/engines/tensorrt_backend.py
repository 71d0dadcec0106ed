"""TensorRT backend: ONNX -> serialized plan on this device, and a runner for the plan.

Written against TensorRT 10.3 (JetPack 6.1/6.2) and kept working on 11.x:

- precision: on 10.x the bundle's precision becomes builder flags (FP16, INT8 for a Q/DQ
  model); 11.x builds strongly typed networks only, so the precision must already be in
  the model (fp16 weights / Q/DQ nodes, which `jetfleet bundle build --precision` puts
  there). What the installed TensorRT cannot do is an UnsupportedError, before building.
- optimization profiles come from the manifest (min/opt/max per dynamic input);
- the workspace limit is a memory pool limit; a DLA core is used with GPU fallback;
- a timing cache per (TensorRT version, GPU) is kept on disk and reused across builds;
- the runner uses named tensors: set_input_shape, set_tensor_address, execute_async_v3.

`tensorrt` is imported inside functions only, so this module imports anywhere; every
pycuda call is in agent/engines/cuda_buffers.py. Names are checked against both APIs with
/work/shared/tools/trt-api-check; the 10-only / 11-only ones sit behind `self.major`.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.engines import cuda_buffers as cb
from agent.engines import precision
from agent.engines.api import (
    BuildError,
    EngineLoadError,
    InferenceError,
    UnsupportedError,
)
from agent.engines.sidecar import write_bytes_atomic, write_plan
from protocol.manifest import BuildOptions

log = structlog.get_logger(__name__)

NAME = "tensorrt"
MIN_MAJOR = 10
_logger_lock = threading.Lock()
_logger: Any = None


def _trt() -> Any:
    import tensorrt

    return tensorrt


def _get_logger() -> Any:
    """One ILogger per process (TensorRT wants the same logger for builder and runtime),
    forwarding TensorRT's messages to structlog and keeping the last errors for reasons."""
    global _logger
    with _logger_lock:
        if _logger is None:
            trt = _trt()

            class _Forward(trt.ILogger):  # type: ignore[misc,name-defined]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.errors: list[str] = []

                def log(self, severity: Any, msg: str) -> None:
                    sev = trt.ILogger.Severity
                    if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                        self.errors = [*self.errors[-4:], msg]
                        log.error("tensorrt", msg=msg)
                    elif severity == sev.WARNING:
                        log.warning("tensorrt", msg=msg)
                    else:
                        log.debug("tensorrt", msg=msg)

            _logger = _Forward()
        return _logger


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


class TensorRTBackend:
    name = NAME

    def __init__(
        self,
        timing_cache_dir: Path | None = None,
        device_index: int = 0,
    ) -> None:
        try:
            trt = _trt()
        except ImportError as e:
            raise UnsupportedError(
                "backend 'tensorrt' needs the tensorrt Python module (JetPack's "
                "python3-libnvinfer) and pycuda, and this device lacks tensorrt: set "
                "backend = onnxruntime or auto"
            ) from e
        if not cb.cuda_available():
            raise UnsupportedError(
                "backend 'tensorrt' needs pycuda and a CUDA device, and neither answered here "
                "(is pycuda built for this JetPack, and is the GPU visible to this user?)"
            )
        self.version = str(trt.__version__)
        self.major = int(self.version.split(".")[0])
        if self.major < MIN_MAJOR:
            raise UnsupportedError(
                f"TensorRT {self.version} is older than {MIN_MAJOR}.0, the oldest this agent "
                "supports (JetPack 6 ships 10.x)"
            )
        self.device_index = device_index
        self.device = cb.device_info(device_index)
        self.timing_cache_dir = Path(timing_cache_dir) if timing_cache_dir else None
        self._dla_cores: int | None = None

    # -- identity ---------------------------------------------------------------------

    @property
    def dla_cores(self) -> int:
        if self._dla_cores is None:
            trt = _trt()
            with cb.cuda_context(self.device_index):
                self._dla_cores = int(trt.Builder(_get_logger()).num_DLA_cores)
        return self._dla_cores

    def cache_key_parts(self) -> dict[str, str]:
        return {
            "gpu": self.device.name,
            "compute_capability": self.device.compute_capability,
            "dla_cores": str(self.dla_cores),
        }

    # -- checks -----------------------------------------------------------------------

    def check_build_options(self, options: BuildOptions, model_path: Path | None = None) -> None:
        """UnsupportedError with a sentence when this TensorRT cannot honour `options`."""
        prec = precision.requested(options)
        if prec != "fp32" and model_path is not None:
            precision.check_precision(prec, self.version, precision.model_traits(model_path))

    # -- build ------------------------------------------------------------------------

    def _timing_cache_path(self) -> Path | None:
        if self.timing_cache_dir is None:
            return None
        gpu = _slug(f"{self.device.name}-sm{self.device.compute_capability}")
        return self.timing_cache_dir / f"timing-trt{self.version}-{gpu}.cache"

    def _attach_timing_cache(self, config: Any) -> None:
        path = self._timing_cache_path()
        data = b""
        if path is not None and path.is_file():
            data = path.read_bytes()
        cache = None
        try:
            cache = config.create_timing_cache(data)
        except Exception as e:  # a truncated/foreign cache must not stop a build
            log.warning("tensorrt_timing_cache_unusable", path=str(path), error=str(e))
        if cache is None:
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    def _save_timing_cache(self, config: Any) -> None:
        path = self._timing_cache_path()
        cache = config.get_timing_cache()
        if path is None or cache is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, bytes(memoryview(cache.serialize())))

    def _add_profiles(self, builder: Any, network: Any, config: Any, opt: BuildOptions) -> None:
        dynamic = []
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = [int(d) for d in t.shape]
            if any(d < 0 for d in shape):
                dynamic.append((t.name, shape))
        if not dynamic:
            return
        profile = builder.create_optimization_profile()
        for name, shape in dynamic:
            p = opt.profiles.get(name)
            if p is None:
                raise BuildError(
                    f"input {name!r} has dynamic dimensions {shape} but the manifest gives no "
                    "build.profiles entry for it (min/opt/max shapes)"
                )
            if len(p.min) != len(shape):
                raise BuildError(
                    f"the profile for {name!r} has rank {len(p.min)}, the input has {len(shape)}"
                )
            for fixed, lo, hi in zip(shape, p.min, p.max, strict=True):
                if fixed >= 0 and not lo == hi == fixed:
                    raise BuildError(
                        f"the profile for {name!r} varies a dimension the model fixes at {fixed}"
                    )
            profile.set_shape(name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)

    def _place_on_dla(self, builder: Any, config: Any, opt: BuildOptions) -> str:
        if opt.dla_core is None:
            return "gpu"
        trt = _trt()
        cores = int(builder.num_DLA_cores)
        if opt.dla_core >= cores:
            # The bundle cannot know every robot's SoC (an Orin Nano has no DLA): the GPU
            # is the documented fallback, not a failure.
            log.warning("tensorrt_dla_unavailable", asked=opt.dla_core, dla_cores=cores)
            return f"gpu (no DLA core {opt.dla_core} here)"
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opt.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        return f"dla{opt.dla_core}+gpu_fallback"

    def build(self, model_path: Path, options: BuildOptions, out_path: Path) -> None:
        trt = _trt()
        self.check_build_options(options, model_path)
        logger = _get_logger()
        with cb.cuda_context(self.device_index):
            builder = trt.Builder(logger)
            flags = 0
            if self.major >= 11:
                flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(model_path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise BuildError(f"TensorRT's ONNX parser rejected {model_path.name}: {errors}")
            config = builder.create_builder_config()
            if options.workspace_mb:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                             options.workspace_mb << 20)  # fmt: skip
            prec = precision.requested(options)
            if self.major < 11:
                # 10.x: weak typing, so the bundle's precision is a permission to the builder.
                if prec == "fp16":
                    config.set_flag(trt.BuilderFlag.FP16)
                elif prec == "int8":
                    config.set_flag(trt.BuilderFlag.INT8)
            self._add_profiles(builder, network, config, options)
            placement = self._place_on_dla(builder, config, options)
            self._attach_timing_cache(config)
            logger.errors = []
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                detail = "; ".join(logger.errors) or "no message from TensorRT"
                raise BuildError(f"TensorRT could not build {model_path.name}: {detail}")
            write_plan(out_path, memoryview(plan))
            self._save_timing_cache(config)
        log.info("tensorrt_built", model=model_path.name, placement=placement,
                 precision=prec, strongly_typed=self.major >= 11)  # fmt: skip

    # -- load -------------------------------------------------------------------------

    def load(self, engine_path: Path) -> TrtEngine:
        try:
            plan = Path(engine_path).read_bytes()
        except OSError as e:
            raise EngineLoadError(f"cannot read engine {engine_path}: {e}") from e
        return TrtEngine(plan, self.device_index, str(engine_path))


class TrtEngine:
    """A deserialized plan with one execution context, stream and growable buffers.

    Thread-safe (one inference at a time per engine, as an execution context requires).
    """

    def __init__(self, plan: bytes, device_index: int, label: str) -> None:
        trt = _trt()
        self._device_index = device_index
        self._lock = threading.Lock()
        with cb.cuda_context(device_index):
            self._runtime = trt.Runtime(_get_logger())
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise EngineLoadError(
                    f"TensorRT could not deserialize {label} (built by another TensorRT "
                    "version or for another GPU?)"
                )
            self._context = self._engine.create_execution_context()
            self._stream = cb.Stream()
            self._timer = cb.EventTimer(self._stream)
        self.inputs: dict[str, np.dtype] = {}
        self.outputs: dict[str, np.dtype] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = dtype
            else:
                self.outputs[name] = dtype
        self._device: dict[str, cb.DeviceBuffer] = {}
        self._host: dict[str, cb.PinnedStaging] = {}
        self.last_gpu_ms: float | None = None  # execute_async_v3 alone, by CUDA events

    def _buffers(self, name: str, nbytes: int) -> tuple[cb.DeviceBuffer, cb.PinnedStaging]:
        dev = self._device.get(name)
        if dev is None:
            dev = self._device[name] = cb.DeviceBuffer(nbytes)
            self._host[name] = cb.PinnedStaging()
        dev.ensure(nbytes)
        return dev, self._host[name]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self.inputs]
        if missing or unknown:
            raise InferenceError(
                f"inputs do not match the engine: missing {missing or 'none'}, unknown "
                f"{unknown or 'none'} (it takes {list(self.inputs)})"
            )
        with self._lock, cb.cuda_context(self._device_index):
            if self._context is None:
                raise InferenceError("this TensorRT engine was closed")
            ctx, stream = self._context, self._stream
            for name in self.inputs:
                dtype = self.inputs[name]
                arr = np.asarray(feeds[name])
                if arr.dtype != dtype:
                    raise InferenceError(f"input {name!r} is {arr.dtype}, the engine takes {dtype}")
                if not ctx.set_input_shape(name, tuple(arr.shape)):
                    raise InferenceError(
                        f"input {name!r} shape {list(arr.shape)} is outside the engine's "
                        "optimization profile"
                    )
                dev, host = self._buffers(name, arr.nbytes)
                staged = host.view(arr.shape, dtype)
                np.copyto(staged, arr)
                dev.upload(staged, stream)
                ctx.set_tensor_address(name, dev.address)
            staged_out: dict[str, np.ndarray] = {}
            for name in self.outputs:
                dtype = self.outputs[name]
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise UnsupportedError(
                        f"output {name!r} has a data-dependent shape {list(shape)}, which "
                        "this runner does not support"
                    )
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                dev, host = self._buffers(name, nbytes)
                ctx.set_tensor_address(name, dev.address)
                staged_out[name] = host.view(shape, dtype)
            self._timer.start()
            if not ctx.execute_async_v3(stream.handle):
                raise InferenceError("TensorRT execute_async_v3 failed (see the agent log)")
            self.last_gpu_ms = self._timer.stop()
            for name in staged_out:
                self._device[name].download(staged_out[name], stream)
            stream.synchronize()
            return {name: staged_out[name].copy() for name in staged_out}

    def device_memory_bytes(self) -> int:
        # The engine's activation memory plus the I/O buffers this runner holds.
        activations = int(self._engine.device_memory_size_v2)
        return activations + sum(b.nbytes for b in self._device.values())

    def close(self) -> None:
        with self._lock:
            if self._engine is None:
                return
            with cb.cuda_context(self._device_index):
                for b in self._device.values():
                    b.free()
                self._device.clear()
                self._host.clear()
                self._context = None
                self._engine = None
                self._runtime = None
