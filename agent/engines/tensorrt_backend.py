"""TensorRT backend: ONNX -> serialized plan on this device, and a runner for the plan.

Written against TensorRT 10.3 (JetPack 6.1/6.2) and kept working on 11.x:

- precision: on 10.x the bundle's precision becomes builder flags (FP16; INT8 with FP16,
  for a Q/DQ model); 11.x builds strongly typed networks only, so the precision must
  already be in the model (fp16 weights / Q/DQ nodes, which `jetfleet bundle build
  --precision` puts there). What the installed TensorRT cannot do is an UnsupportedError,
  before building.
- TensorRT's bundled plugins (EfficientNMS, RoiAlign, ...) are registered once per
  process, before any parse or deserialization.
- optimization profiles come from the manifest (min/opt/max per dynamic input);
  shape-tensor inputs are refused (their values would need profiles the manifest cannot
  express);
- the workspace is capped: the manifest's workspace_mb, else half the free memory (an
  Orin's GPU shares the robot's RAM: an uncapped build can get the robot's own service
  OOM-killed);
- a DLA core is used with GPU fallback for fp16/int8 bundles; the core is set again on
  the runtime at load (a plan for DLA core 1 would otherwise run on core 0);
- a timing cache per (TensorRT version, GPU) is kept on disk and reused across builds;
- build progress: an IProgressMonitor forwards TensorRT's phases to agent.engines.progress
  (the worker makes BUILDING events of them); a build that fails "Could not find any
  implementation" says that usually means memory, with the workspace cap and free memory;
- layer placement: builds that ask for a DLA core keep DETAILED profiling verbosity, so
  the engine inspector can count the layers on the DLA and on the GPU
  (TrtEngine.layer_placement, judged by the gate's max_gpu_fallback_layers);
- the runner uses named tensors: set_input_shape, set_tensor_address, execute_async_v3,
  and an output allocator for every output, so outputs whose shape depends on the data
  (NonMaxSuppression, NonZero) work.

`tensorrt` is imported inside functions only, so this module imports anywhere; every
pycuda call is in agent/engines/cuda_buffers.py. Names are checked against both APIs with
/work/shared/tools/trt-api-check; the 10-only / 11-only ones sit behind `self.major`.

Why not Polygraphy's TrtRunner: it prints to stdout (the engine job's protocol channel),
raises its own errors, reuses host buffers across calls and is not thread-safe; the parts
of it we need (plugins, context check, output allocator, shape-tensor check) are here.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.engines import cuda_buffers as cb
from agent.engines import precision
from agent.engines import progress as build_progress
from agent.engines.api import (
    BuildError,
    EngineError,
    EngineLoadError,
    InferenceError,
    UnsupportedError,
)
from agent.engines.sidecar import read_meta, write_plan
from agent.hardware import meminfo_bytes
from protocol.fsio import write_atomic
from protocol.manifest import BuildOptions

log = structlog.get_logger(__name__)

NAME = "tensorrt"
MIN_MAJOR = 10
MIN_WORKSPACE = 16 << 20
_lock = threading.Lock()
_logger: Any = None
_plugins_registered = False
_allocator_class: Any = None
_monitor_class: Any = None
# TensorRT's words when no tactic fits the memory it may use (NVIDIA/TensorRT #4258).
_NO_IMPLEMENTATION = "could not find any implementation"


def _trt() -> Any:
    import tensorrt

    return tensorrt


def _get_logger() -> Any:
    """One ILogger per process (TensorRT wants the same logger for builder and runtime),
    forwarding TensorRT's messages to structlog and keeping the last errors for reasons."""
    global _logger
    with _lock:
        if _logger is None:
            trt = _trt()

            class _Forward(trt.ILogger):  # type: ignore[misc,name-defined]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.errors: list[str] = []

                def log(self, severity: Any, msg: str) -> None:
                    # TensorRT calls this from C++ declared noexcept: an exception escaping
                    # here (a broken log handler, a KeyboardInterrupt) ends the process.
                    with contextlib.suppress(BaseException):
                        self._forward(severity, msg)

                def _forward(self, severity: Any, msg: str) -> None:
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


def _register_plugins() -> None:
    """TensorRT's bundled plugins, once per process and before any parse or deserialize:
    without them a detector exported with EfficientNMS or RoiAlign fails "Plugin not found"."""
    global _plugins_registered
    logger = _get_logger()
    with _lock:
        if _plugins_registered:
            return
        if not _trt().init_libnvinfer_plugins(logger, ""):
            log.warning("tensorrt_plugins_unavailable", detail="models with plugin ops will fail")
        _plugins_registered = True


def default_workspace_bytes(free_bytes: int) -> int:
    """The build workspace cap when the manifest sets none: half the free (shared) memory,
    so that a build cannot take what the robot's own service needs."""
    return max(MIN_WORKSPACE, free_bytes // 2)


def _numpy_dtype(trt: Any, trt_dtype: Any, name: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except TypeError as e:  # bf16, fp8, int4, fp4: numpy has no such type
        raise UnsupportedError(
            f"tensor {name!r} is {trt_dtype}, which has no numpy type: export the model with "
            "fp32/fp16/int inputs and outputs (casts inside the model are fine)"
        ) from e


_SHAPE_TENSOR = (
    "is a shape tensor (its values feed a shape computation, e.g. Reshape's shape), which "
    "the TensorRT backend does not support (its build profile would need values the "
    "manifest cannot express): make it a constant in the model, or use backend = onnxruntime"
)


def _output_allocator() -> Any:
    """An IOutputAllocator: TensorRT sizes each output at enqueue time, which is the only way
    to run outputs whose shape depends on the data (NonMaxSuppression, NonZero)."""
    global _allocator_class
    with _lock:
        if _allocator_class is None:
            _allocator_class = _define_allocator(_trt())
    return _allocator_class()


def _define_allocator(trt: Any) -> Any:
    class _Outputs(trt.IOutputAllocator):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, cb.DeviceBuffer] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.error: str | None = None

        # TensorRT calls these from inside enqueue (C++): nothing may raise out of them;
        # a 0 (null) address makes execute_async_v3 fail, with self.error saying why.
        def reallocate_output(
            self, tensor_name: str, memory: int, size: int, alignment: int
        ) -> int:
            return self._grow(tensor_name, size)

        def reallocate_output_async(
            self, tensor_name: str, memory: int, size: int, alignment: int, stream: int
        ) -> int:
            return self._grow(tensor_name, size)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            try:
                self.shapes[tensor_name] = tuple(int(d) for d in shape)
            except BaseException as e:
                self.error = f"{type(e).__name__}: {e}"

        def _grow(self, name: str, size: int) -> int:
            try:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = cb.DeviceBuffer(size)
                buf.ensure(size)
                return buf.address
            except BaseException as e:
                self.error = f"{type(e).__name__}: {e}"
                return 0

        def free(self) -> None:
            for b in self.buffers.values():
                b.free()
            self.buffers.clear()

    return _Outputs


def _progress_monitor() -> Any:
    """An IProgressMonitor feeding agent.engines.progress (BUILDING events)."""
    global _monitor_class
    with _lock:
        if _monitor_class is None:
            _monitor_class = _define_monitor(_trt())
    return _monitor_class()


def _define_monitor(trt: Any) -> Any:
    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases = build_progress.PhaseTracker()

        # Called from inside the build (C++, noexcept): nothing may raise out of these.
        # step_complete returning False would cancel the build; a cancel kills the child.
        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with contextlib.suppress(BaseException):
                self.phases.start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with contextlib.suppress(BaseException):
                self.phases.step(phase_name, step)
            return True

        def phase_finish(self, phase_name: str) -> None:
            with contextlib.suppress(BaseException):
                self.phases.finish(phase_name)

    return _Monitor


def _memory_hint(detail: str, workspace: int, free: int) -> str:
    if _NO_IMPLEMENTATION not in detail.lower():
        return ""
    return (
        f" (this usually means the build ran out of memory: the workspace was capped at "
        f"{workspace >> 20} MiB with {free >> 20} MiB free; stop other GPU work on the robot, "
        "lower build.workspace_mb or the largest build.profiles shapes)"
    )


def layer_counts(info: str, dla_requested: bool) -> dict[str, int] | None:
    """{"dla": n, "gpu": m} engine layers from the inspector's JSON, or None when it does
    not say (layer names only, from a DLA build without DETAILED verbosity)."""
    layers = json.loads(info).get("Layers") or []
    if all(isinstance(layer, dict) for layer in layers):
        dla = sum(1 for layer in layers if str(layer.get("LayerType", "")).upper() == "DLA")
        return {"dla": dla, "gpu": len(layers) - dla}
    return None if dla_requested else {"dla": 0, "gpu": len(layers)}


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
        _register_plugins()
        self.device_index = device_index
        self.device = cb.device_info(device_index)
        self.timing_cache_dir = Path(timing_cache_dir) if timing_cache_dir else None
        self._dla_cores: int | None = None

    # -- identity ---------------------------------------------------------------------

    @property
    def dla_cores(self) -> int:
        # IRuntime answers this; a Builder would cost seconds and hundreds of MB per job.
        if self._dla_cores is None:
            with cb.cuda_context(self.device_index):
                self._dla_cores = int(_trt().Runtime(_get_logger()).num_DLA_cores)
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
        if cache is not None and config.set_timing_cache(cache, False):
            return
        if cache is not None:  # refused: made by another TensorRT or for another device
            log.warning("tensorrt_timing_cache_rejected", path=str(path))
        if not config.set_timing_cache(config.create_timing_cache(b""), False):
            log.warning("tensorrt_timing_cache_disabled", path=str(path))

    def _save_timing_cache(self, config: Any) -> None:
        path = self._timing_cache_path()
        cache = config.get_timing_cache()
        if path is None or cache is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, bytes(memoryview(cache.serialize())))

    def _parse(self, network: Any, logger: Any, model_path: Path) -> Any:
        """The parser, which the caller keeps until the build is done: it owns the
        weights the network refers to."""
        parser = _trt().OnnxParser(network, logger)
        if not parser.parse_from_file(str(model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"TensorRT's ONNX parser rejected {model_path.name}: {errors}")
        for i in range(network.num_inputs):
            t = network.get_input(i)
            if t.is_shape_tensor:
                raise UnsupportedError(f"input {t.name!r} {_SHAPE_TENSOR}")
        return parser

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

    def _free_memory(self) -> int:
        free, _ = cb.mem_get_info()
        if self.device.integrated:
            # On a Jetson, CUDA's free figure leaves out the page cache the kernel would
            # give back; MemAvailable counts it. The GPU and the robot share this memory.
            free = max(free, meminfo_bytes("MemAvailable") or 0)
        return free

    def _limit_workspace(self, config: Any, opt: BuildOptions) -> tuple[int, int]:
        """(workspace cap, free memory): the manifest's workspace_mb, never above half the
        free memory (the robot's own service needs the rest)."""
        free = self._free_memory()
        cap = default_workspace_bytes(free)
        limit = opt.workspace_mb << 20 if opt.workspace_mb else cap
        if limit > cap:
            log.warning("tensorrt_workspace_capped", workspace_mb=opt.workspace_mb,
                        capped_mb=cap >> 20, free_mb=free >> 20)  # fmt: skip
            limit = cap
        config.set_memory_pool_limit(_trt().MemoryPoolType.WORKSPACE, limit)
        return limit, free

    def _place_on_dla(
        self, builder: Any, network: Any, config: Any, opt: BuildOptions, prec: str
    ) -> str:
        trt = _trt()
        if opt.dla_core is not None:
            # Layer placement in the plan, for the engine inspector (layer_placement): it
            # stores per-layer detail in the plan; only builds that ask for a DLA pay it.
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        core, placement = precision.dla_core_to_use(opt.dla_core, int(builder.num_DLA_cores), prec)
        if core is None:
            if opt.dla_core is not None:
                log.warning("tensorrt_dla_not_used", placement=placement)
            return placement
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        on_dla = sum(1 for layer in layers if config.can_run_on_DLA(layer))
        return f"{placement}: {on_dla} of {len(layers)} layers can run on DLA"

    def build(self, model_path: Path, options: BuildOptions, out_path: Path) -> None:
        trt = _trt()
        self.check_build_options(options, model_path)
        logger = _get_logger()
        prec = precision.requested(options)
        with cb.cuda_context(self.device_index):
            builder = trt.Builder(logger)
            flags = 0
            if self.major >= 11:
                flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = self._parse(network, logger, model_path)
            config = builder.create_builder_config()
            workspace, free = self._limit_workspace(config, options)
            # 10.x: weak typing, so the bundle's precision is a permission to the builder.
            for flag in precision.builder_flags(prec, self.major):
                config.set_flag(getattr(trt.BuilderFlag, flag))
            self._add_profiles(builder, network, config, options)
            placement = self._place_on_dla(builder, network, config, options, prec)
            self._attach_timing_cache(config)
            monitor = _progress_monitor()  # kept referenced until the build returns
            config.progress_monitor = monitor
            logger.errors = []
            plan = builder.build_serialized_network(network, config)
            del monitor
            if plan is None:
                detail = "; ".join(logger.errors) or "no message from TensorRT"
                raise BuildError(
                    f"TensorRT could not build {model_path.name}: {detail}"
                    + _memory_hint(detail, workspace, free)
                )
            del parser  # only now: the build read the weights it owns
            write_plan(out_path, memoryview(plan))
            self._save_timing_cache(config)
        log.info("tensorrt_built", model=model_path.name, placement=placement, precision=prec,
                 strongly_typed=self.major >= 11, workspace=workspace)  # fmt: skip

    # -- load -------------------------------------------------------------------------

    def load(self, engine_path: Path) -> TrtEngine:
        try:
            plan = Path(engine_path).read_bytes()
        except OSError as e:
            raise EngineLoadError(f"cannot read engine {engine_path}: {e}") from e
        return TrtEngine(
            plan, self.device_index, str(engine_path), dla_core=_built_dla_core(engine_path)
        )


def _built_dla_core(engine_path: Path) -> int | None:
    """The DLA core the plan was built for, from its sidecar (None: GPU, or no sidecar)."""
    try:
        build = read_meta(Path(engine_path)).extra.get("build") or {}
    except EngineLoadError:
        return None
    core = build.get("dla_core") if isinstance(build, dict) else None
    return core if isinstance(core, int) else None


class TrtEngine:
    """A deserialized plan with one execution context, stream and growable buffers.

    Thread-safe (one inference at a time per engine, as an execution context requires).
    Any failure while loading is an EngineError, after everything made so far is released.
    """

    def __init__(
        self, plan: bytes, device_index: int, label: str, *, dla_core: int | None = None
    ) -> None:
        _register_plugins()
        self._device_index = device_index
        self._lock = threading.Lock()
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: cb.Stream | None = None
        self._timer: cb.EventTimer | None = None
        self._outputs: Any = None  # the output allocator
        self._device: dict[str, cb.DeviceBuffer] = {}
        self._host: dict[str, cb.PinnedStaging] = {}
        self.inputs: dict[str, np.dtype] = {}
        self.outputs: dict[str, np.dtype] = {}
        self.dla_core: int | None = None  # the DLA core set on the runtime, if any
        self._dla_requested = dla_core is not None  # the build asked for one (sidecar)
        self.last_gpu_ms: float | None = None  # execute_async_v3 alone, by CUDA events
        self.closed = False
        with cb.cuda_context(device_index):
            try:
                self._open(plan, label, dla_core)
            except EngineError:
                self._release()
                raise
            except Exception as e:  # pycuda's LogicError/MemoryError, TensorRT's RuntimeError
                self._release()
                raise EngineLoadError(
                    f"TensorRT could not load {label}: {type(e).__name__}: {e}"
                ) from e
        log.info("tensorrt_engine_loaded", engine=label, dla_core=self.dla_core)

    def _open(self, plan: bytes, label: str, dla_core: int | None) -> None:
        trt = _trt()
        self._runtime = trt.Runtime(_get_logger())
        if dla_core is not None and dla_core < int(self._runtime.num_DLA_cores):
            self._runtime.DLA_core = dla_core  # else a plan for core 1 runs on core 0
            self.dla_core = dla_core
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineLoadError(
                f"TensorRT could not deserialize {label} (built by another TensorRT "
                "version or for another GPU?)"
            )
        self._read_io(trt)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineLoadError(
                f"TensorRT could not create an execution context for {label} (out of GPU memory?)"
            )
        self._stream = cb.Stream()
        self._timer = cb.EventTimer(self._stream)
        self._outputs = _output_allocator()
        for name in self.outputs:
            self._context.set_output_allocator(name, self._outputs)

    def _read_io(self, trt: Any) -> None:
        engine = self._engine
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if engine.is_shape_inference_io(name):
                raise UnsupportedError(
                    f"{'input' if is_input else 'output'} {name!r} {_SHAPE_TENSOR}"
                )
            dtype = _numpy_dtype(trt, engine.get_tensor_dtype(name), name)
            (self.inputs if is_input else self.outputs)[name] = dtype

    def _input_buffers(self, name: str, nbytes: int) -> tuple[cb.DeviceBuffer, cb.PinnedStaging]:
        dev = self._device.get(name)
        if dev is None:
            dev = self._device[name] = cb.DeviceBuffer(nbytes)
        dev.ensure(nbytes)
        return dev, self._host.setdefault(name, cb.PinnedStaging())

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        unknown = [n for n in feeds if n not in self.inputs]
        if missing or unknown:
            raise InferenceError(
                f"inputs do not match the engine: missing {missing or 'none'}, unknown "
                f"{unknown or 'none'} (it takes {list(self.inputs)})"
            )
        with self._lock, cb.cuda_context(self._device_index):
            if self.closed or self._stream is None or self._timer is None:
                raise InferenceError("this TensorRT engine was closed")
            stream, timer = self._stream, self._timer
            for name in self.inputs:
                self._stage_input(name, feeds[name], stream)
            self._outputs.error = None
            self._outputs.shapes.clear()
            timer.start()
            if not self._context.execute_async_v3(stream.handle):
                why = self._outputs.error or "see the agent log"
                raise InferenceError(f"TensorRT execute_async_v3 failed ({why})")
            timer.stop()
            if self._shapes_pending():
                stream.synchronize()  # a data-dependent shape TensorRT has not told yet
            staged = {name: self._fetch_output(name, stream) for name in self.outputs}
            stream.synchronize()
            self.last_gpu_ms = timer.elapsed_ms()  # after the sync the copies needed anyway
            return {name: staged[name].copy() for name in staged}

    def _stage_input(self, name: str, value: np.ndarray, stream: cb.Stream) -> None:
        dtype = self.inputs[name]
        arr = np.asarray(value)
        if arr.dtype != dtype:
            raise InferenceError(f"input {name!r} is {arr.dtype}, the engine takes {dtype}")
        if not self._context.set_input_shape(name, tuple(arr.shape)):
            raise InferenceError(
                f"input {name!r} shape {list(arr.shape)} is outside the engine's "
                "optimization profile"
            )
        dev, host = self._input_buffers(name, arr.nbytes)
        staged = host.view(arr.shape, dtype)
        np.copyto(staged, arr)
        dev.upload(staged, stream)
        self._context.set_tensor_address(name, dev.address)

    def _shapes_pending(self) -> bool:
        return any(
            name not in self._outputs.shapes
            and any(int(d) < 0 for d in self._context.get_tensor_shape(name))
            for name in self.outputs
        )

    def _fetch_output(self, name: str, stream: cb.Stream) -> np.ndarray:
        """Queue the copy of one output to pinned host memory; its shape is known once
        execute_async_v3 has returned (TensorRT waits itself for data-dependent ones)."""
        shape = self._outputs.shapes.get(name)
        if shape is None:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise InferenceError(f"TensorRT gave output {name!r} no shape ({list(shape)})")
        host = self._host.setdefault(name, cb.PinnedStaging()).view(shape, self.outputs[name])
        device = self._outputs.buffers.get(name)
        if host.nbytes and device is None:
            raise InferenceError(f"TensorRT wrote output {name!r} nowhere (no allocation)")
        if host.nbytes:
            device.download(host, stream)
        return host

    def layer_placement(self) -> dict[str, int] | None:
        """{"dla": n, "gpu": m}: the engine's layers on the DLA and on the GPU, by
        TensorRT's engine inspector; None when the plan does not say."""
        with self._lock, cb.cuda_context(self._device_index):
            if self._engine is None:
                raise InferenceError("this TensorRT engine was closed")
            inspector = self._engine.create_engine_inspector()
            info = inspector.get_engine_information(_trt().LayerInformationFormat.JSON)
        try:
            return layer_counts(str(info), self._dla_requested)
        except (ValueError, AttributeError) as e:
            log.warning("tensorrt_layer_information_unreadable", error=str(e))
            return None

    def device_memory_bytes(self) -> int:
        # The engine's activation memory plus the I/O buffers this runner holds.
        activations = int(self._engine.device_memory_size_v2) if self._engine is not None else 0
        outputs = self._outputs.buffers.values() if self._outputs is not None else []
        return activations + sum(b.nbytes for b in [*self._device.values(), *outputs])

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            with cb.cuda_context(self._device_index):
                self._release()

    def _release(self) -> None:
        """Free all this engine holds, with the CUDA context pushed (pycuda objects freed by
        the garbage collector on another thread leak and warn). Also after a failed load."""
        self.closed = True
        self._context = None  # first: it uses the buffers, the engine and the runtime
        if self._outputs is not None:
            self._outputs.free()
        for b in self._device.values():
            b.free()
        for h in self._host.values():
            h.close()
        self._device.clear()
        self._host.clear()
        if self._timer is not None:
            self._timer.close()
        if self._stream is not None:
            self._stream.close()
        self._outputs = self._timer = self._stream = None
        self._engine = None
        self._runtime = None
