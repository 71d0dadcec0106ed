"""A stand-in for a Jetson's TensorRT and CUDA (pycuda), for machines that have neither.

Only the hardware layer is faked; agent/engines/tensorrt_backend.py and cuda_buffers.py run
unchanged on top of it. It behaves the way NVIDIA documents the real ones where our runner
depends on it, and it records what real hardware would make hard to observe:

- every CUDA handle (stream, event, device allocation) knows whether it was destroyed with
  a context pushed on the destroying thread (pycuda otherwise leaks it and warns);
- the order of host-side operations (copies, launches, synchronizations);
- which DLA core the runtime was set to, and whether plugins were registered first;
- on the build side, the flags, pool limits, DLA settings and timing cache a builder config
  got, and whether the ONNX parser (which owns the weights) was still alive at build time.

A build reports two top-level phases of three steps (one with a nested phase) to the
config's progress monitor, as TensorRT 10 does; REC.build_error makes it fail with that
error logged, as an out-of-memory build does. A plan here is JSON: {"io": [{"name",
"mode": "input"|"output", "dtype", "shape", "op"?}], "context": "ok"|"none", "layers":
[...]}; outputs compute "double" (2 * the input "x", its last axis cut to the output's
"width" when the ONNX model fixes one) or "nonzero" (indices of x > 0: a
data-dependent shape). "layers" is what the engine inspector gives: names only, or with
DETAILED profiling verbosity {"Name", "LayerType"} with the DLA runs fused as "DLA" layers.

`write_site(dir)` makes a folder that, first on PYTHONPATH, makes `import tensorrt` and
`import pycuda.driver` load these fakes in any process (a real agent's engine child).
"""

from __future__ import annotations

import enum
import itertools
import json
import threading
import types
from typing import Any

import numpy as np


class Recorder:
    def __init__(self) -> None:
        self.plugin_registrations = 0  # process-wide, like TensorRT's plugin registry
        self.reset()

    def reset(self) -> None:
        self.ops: list[str] = []
        self.leaks: list[str] = []
        self.live: dict[str, int] = {"Stream": 0, "Event": 0, "DeviceAllocation": 0}
        self.fail_next: dict[str, BaseException] = {}  # "Stream" -> error at construction
        self.dla_cores = 2
        self.runtimes: list[Any] = []
        self.configs: list[Any] = []
        self.builders = 0
        self.build_error: str | None = None  # logged by a build that then returns None


REC = Recorder()
_tls = threading.local()
_memory: dict[int, bytearray] = {}
_addresses = itertools.count(0x10000, 0x1000)


def _stack() -> list[Any]:
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    return _tls.stack  # type: ignore[no-any-return]


# -- pycuda.driver -------------------------------------------------------------------------


class _Handle:
    kind = ""

    def __init__(self) -> None:
        err = REC.fail_next.pop(self.kind, None)
        if err is not None:
            raise err
        REC.live[self.kind] += 1
        self._alive = True

    def _destroy(self) -> None:
        if not getattr(self, "_alive", False):
            return
        self._alive = False
        REC.live[self.kind] -= 1
        if not _stack():
            REC.leaks.append(f"{self.kind} destroyed outside a CUDA context")

    def __del__(self) -> None:
        self._destroy()


class Stream(_Handle):
    kind = "Stream"

    @property
    def handle(self) -> int:
        return id(self)

    def synchronize(self) -> None:
        REC.ops.append("stream.synchronize")


class Event(_Handle):
    kind = "Event"

    def record(self, stream: Stream) -> None:
        REC.ops.append("event.record")

    def synchronize(self) -> None:
        REC.ops.append("event.synchronize")

    def time_till(self, other: Event) -> float:
        return 0.25


class DeviceAllocation(_Handle):
    kind = "DeviceAllocation"

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.address = next(_addresses)
        _memory[self.address] = bytearray(nbytes)

    def __int__(self) -> int:
        return self.address

    def free(self) -> None:
        _memory.pop(self.address, None)
        self._destroy()


class _Context:
    def push(self) -> None:
        _stack().append(self)


class _ContextClass:
    @staticmethod
    def pop() -> None:
        _stack().pop()


class _Device:
    def __init__(self, index: int) -> None:
        self.index = index

    @staticmethod
    def count() -> int:
        return 1

    def retain_primary_context(self) -> _Context:
        return _Context()

    def name(self) -> str:
        return "Orin (nvgpu)"

    def compute_capability(self) -> tuple[int, int]:
        return (8, 7)

    def total_memory(self) -> int:
        return 8 << 30

    def get_attribute(self, attribute: Any) -> int:
        return 1


def _mem_alloc(nbytes: int) -> DeviceAllocation:
    if not _stack():
        raise RuntimeError("cuMemAlloc failed: invalid device context")
    return DeviceAllocation(nbytes)


def _htod(dev: DeviceAllocation, host: np.ndarray, stream: Stream) -> None:
    REC.ops.append("memcpy_htod")
    _memory[int(dev)][: host.nbytes] = host.tobytes()


def _dtoh(host: np.ndarray, dev: DeviceAllocation, stream: Stream) -> None:
    REC.ops.append("memcpy_dtoh")
    host.reshape(-1).view(np.uint8)[:] = np.frombuffer(
        bytes(_memory[int(dev)][: host.nbytes]), np.uint8
    )


driver = types.ModuleType("pycuda.driver")
driver.init = lambda: None  # type: ignore[attr-defined]
driver.Device = _Device  # type: ignore[attr-defined]
driver.Context = _ContextClass  # type: ignore[attr-defined]
driver.Stream = Stream  # type: ignore[attr-defined]
driver.Event = Event  # type: ignore[attr-defined]
driver.mem_alloc = _mem_alloc  # type: ignore[attr-defined]
driver.mem_get_info = lambda: (2 << 30, 8 << 30)  # type: ignore[attr-defined]
driver.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)  # type: ignore[attr-defined]
driver.memcpy_htod_async = _htod  # type: ignore[attr-defined]
driver.memcpy_dtoh_async = _dtoh  # type: ignore[attr-defined]
driver.device_attribute = types.SimpleNamespace(INTEGRATED=18)  # type: ignore[attr-defined]
pycuda = types.ModuleType("pycuda")
pycuda.driver = driver  # type: ignore[attr-defined]
pycuda.__version__ = "2024.1.2"  # type: ignore[attr-defined]


# -- tensorrt ------------------------------------------------------------------------------


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    BF16 = "bf16"
    FP8 = "fp8"


def nptype(trt_type: DataType) -> Any:
    if trt_type in (DataType.BF16, DataType.FP8):  # as the real tensorrt.nptype does
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return np.dtype(trt_type.value).type


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


class IOutputAllocator:
    def __init__(self) -> None:
        pass


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class ProfilingVerbosity(enum.Enum):
    LAYER_NAMES_ONLY = "LAYER_NAMES_ONLY"
    NONE = "NONE"
    DETAILED = "DETAILED"


class LayerInformationFormat(enum.Enum):
    ONELINE = "ONELINE"
    JSON = "JSON"


class EngineInspector:
    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers

    def get_engine_information(self, fmt: LayerInformationFormat) -> str:
        assert fmt is LayerInformationFormat.JSON
        return json.dumps({"Layers": self.layers, "Bindings": []})


def init_libnvinfer_plugins(logger: Any, namespace: str) -> bool:
    REC.plugin_registrations += 1
    return True


class Runtime:
    def __init__(self, logger: Any) -> None:
        self.num_DLA_cores = REC.dla_cores
        self.DLA_core = -1
        REC.runtimes.append(self)

    def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
        if not REC.plugin_registrations:
            return None  # "Plugin not found" for a plan with plugin layers
        try:
            spec = json.loads(plan)
        except ValueError:
            return None
        return Engine(spec)


class Engine:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.io = {t["name"]: t for t in spec["io"]}
        self.names = [t["name"] for t in spec["io"]]
        self.context_mode = spec.get("context", "ok")
        self.layers = spec.get("layers", [])
        self.device_memory_size_v2 = 4096

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector(self.layers)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if self.io[name]["mode"] == "input" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self.io[name]["dtype"]]

    def is_shape_inference_io(self, name: str) -> bool:
        return bool(self.io[name].get("shape_tensor"))

    def create_execution_context(self) -> Context | None:
        return None if self.context_mode == "none" else Context(self)


class Context:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.allocators: dict[str, Any] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        want = self.engine.io[name]["shape"]
        if len(shape) != len(want) or any(
            w >= 0 and w != s for w, s in zip(want, shape, strict=False)
        ):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def set_output_allocator(self, name: str, allocator: Any) -> bool:
        self.allocators[name] = allocator
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        t = self.engine.io[name]
        if t["mode"] == "input":
            return self.shapes.get(name, tuple(t["shape"]))
        if t.get("op") != "double":
            return (1, -1)
        x = self.shapes["x"]
        return (*x[:-1], t["width"]) if t.get("width") else x

    def execute_async_v3(self, stream_handle: int) -> bool:
        REC.ops.append("execute_async_v3")
        x_shape = self.shapes["x"]
        x = np.frombuffer(bytes(_memory[self.addresses["x"]]), np.float32)
        x = x[: int(np.prod(x_shape))].reshape(x_shape)
        for name, t in self.engine.io.items():
            if t["mode"] != "output":
                continue
            if t["op"] == "double":
                y = 2 * x[..., : t["width"]] if t.get("width") else 2 * x
            else:
                y = np.stack(np.nonzero(x.reshape(-1) > 0))
            y = y.astype(nptype(DataType[t["dtype"]]))
            alloc = self.allocators[name]
            address = alloc.reallocate_output_async(name, 0, y.nbytes, 256, stream_handle)
            if not address:
                return False
            _memory[address][: y.nbytes] = y.tobytes()
            alloc.notify_shape(name, y.shape)
        return True


class BuilderFlag(enum.Enum):
    FP16 = "FP16"
    INT8 = "INT8"
    GPU_FALLBACK = "GPU_FALLBACK"


class MemoryPoolType(enum.Enum):
    WORKSPACE = "WORKSPACE"


class DeviceType(enum.Enum):
    GPU = "GPU"
    DLA = "DLA"


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


_CACHE_MAGIC = b"fake-timing-cache-10.3.0"
_DLA_OPS = {"Conv", "Relu", "MaxPool", "BatchNormalization"}


class _Tensor:
    def __init__(self, name: str, shape: list[int], is_shape_tensor: bool) -> None:
        self.name, self.shape, self.is_shape_tensor = name, shape, is_shape_tensor


class _Layer:
    def __init__(self, op_type: str) -> None:
        self.op_type = op_type


class Network:
    def __init__(self) -> None:
        self.inputs: list[_Tensor] = []
        self.outputs: list[str] = []
        self.widths: dict[str, int] = {}  # an output's fixed last axis, from the model
        self.layers: list[_Layer] = []
        self.parser: Any = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> _Layer:
        return self.layers[i]


class OnnxParser:
    def __init__(self, network: Network, logger: Any) -> None:
        import weakref

        self.network = network
        network.parser = weakref.ref(self)
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        import onnx

        graph = onnx.load(path).graph
        shape_inputs = {n.input[1] for n in graph.node if n.op_type == "Reshape"}
        inits = {i.name for i in graph.initializer}
        for vi in graph.input:
            if vi.name in inits:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in vi.type.tensor_type.shape.dim]  # fmt: skip
            self.network.inputs.append(_Tensor(vi.name, dims, vi.name in shape_inputs))
        self.network.outputs = [vi.name for vi in graph.output]
        for vi in graph.output:
            last = vi.type.tensor_type.shape.dim[-1:]
            if last and last[0].HasField("dim_value"):
                self.network.widths[vi.name] = last[0].dim_value
        self.network.layers = [_Layer(n.op_type) for n in graph.node]
        return True


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.foreign = bool(data) and not data.startswith(_CACHE_MAGIC)

    def serialize(self) -> bytes:
        return _CACHE_MAGIC + b"\0tactics"


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, Any, Any]] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = (lo, opt, hi)


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.pool_limits: dict[str, int] = {}
        self.default_device_type = DeviceType.GPU
        self.DLA_core = -1
        self.timing_cache: TimingCache | None = None
        self.profiles: list[Profile] = []
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.progress_monitor: Any = None

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag.value)

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pool_limits[pool.value] = size

    def can_run_on_DLA(self, layer: _Layer) -> bool:
        return layer.op_type in _DLA_OPS

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if cache.foreign and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self.timing_cache

    def add_optimization_profile(self, profile: Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.num_DLA_cores = REC.dla_cores
        REC.builders += 1

    def create_network(self, flags: int) -> Network:
        return Network()

    def create_builder_config(self) -> BuilderConfig:
        REC.configs.append(config := BuilderConfig())
        return config

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
        if network.parser is None or network.parser() is None:
            self.logger.log(ILogger.Severity.ERROR, "weights were freed with the parser")
            return None
        _report_phases(config.progress_monitor)
        if REC.build_error is not None:
            self.logger.log(ILogger.Severity.ERROR, REC.build_error)
            return None
        io = [{"name": t.name, "mode": "input", "dtype": "FLOAT", "shape": t.shape}
              for t in network.inputs]  # fmt: skip
        io += [{"name": n, "mode": "output", "dtype": "FLOAT", "shape": [-1], "op": "double",
                "width": network.widths.get(n)} for n in network.outputs]  # fmt: skip
        layers = _engine_layers(network, config)
        return json.dumps({"io": io, "context": "ok", "layers": layers}).encode()


def _report_phases(monitor: Any) -> None:
    if monitor is None:
        return
    for top, inner in (("Building engine", "Tactic selection"), ("Serializing", None)):
        monitor.phase_start(top, None, 3)
        for step in range(3):
            if inner is not None and step == 1:
                monitor.phase_start(inner, top, 2)
                monitor.step_complete(inner, 0)
                monitor.step_complete(inner, 1)
                monitor.phase_finish(inner)
            monitor.step_complete(top, step)
        monitor.phase_finish(top)


def _engine_layers(network: Network, config: BuilderConfig) -> list[Any]:
    """Engine layers as the inspector lists them: runs of layers that can run on the DLA
    fuse into one "DLA" layer; the rest stay GPU layers."""
    on_dla = config.default_device_type is DeviceType.DLA
    layers: list[dict[str, str]] = []
    for i, layer in enumerate(network.layers):
        name = f"{layer.op_type.lower()}_{i}"
        if on_dla and config.can_run_on_DLA(layer):
            if layers and layers[-1]["LayerType"] == "DLA":
                first = layers[-1]["Name"][: -len("]}")].split("...")[0]
                layers[-1]["Name"] = f"{first}...{name}]}}"
                continue
            layers.append({"Name": f"{{ForeignNode[{name}]}}", "LayerType": "DLA"})
        else:
            layers.append({"Name": name, "LayerType": layer.op_type})
    if config.profiling_verbosity is ProfilingVerbosity.DETAILED:
        return layers
    return [layer["Name"] for layer in layers]


tensorrt = types.ModuleType("tensorrt")
for _name, _value in {
    "__version__": "10.3.0",
    "DataType": DataType,
    "nptype": nptype,
    "TensorIOMode": TensorIOMode,
    "ILogger": ILogger,
    "IOutputAllocator": IOutputAllocator,
    "IProgressMonitor": IProgressMonitor,
    "ProfilingVerbosity": ProfilingVerbosity,
    "LayerInformationFormat": LayerInformationFormat,
    "init_libnvinfer_plugins": init_libnvinfer_plugins,
    "Runtime": Runtime,
    "Builder": Builder,
    "OnnxParser": OnnxParser,
    "BuilderFlag": BuilderFlag,
    "MemoryPoolType": MemoryPoolType,
    "DeviceType": DeviceType,
    "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
}.items():
    setattr(tensorrt, _name, _value)


def plan(*io: dict[str, Any], context: str = "ok") -> bytes:
    return json.dumps({"io": list(io), "context": context}).encode()


def write_site(folder: Any) -> Any:
    """A PYTHONPATH folder whose `tensorrt` and `pycuda` are these fakes, for a real agent's
    engine child."""
    from pathlib import Path

    site = Path(folder)
    (site / "pycuda").mkdir(parents=True, exist_ok=True)
    (site / "tensorrt.py").write_text(
        "import sys\n"
        "from tests.agent import fake_jetson\n"
        "sys.modules[__name__] = fake_jetson.tensorrt\n"
    )
    (site / "pycuda" / "__init__.py").write_text(
        "import sys\n"
        "from tests.agent import fake_jetson\n"
        "sys.modules['pycuda.driver'] = fake_jetson.driver\n"
        "sys.modules[__name__] = fake_jetson.pycuda\n"
    )
    return site
