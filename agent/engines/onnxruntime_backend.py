"""ONNX Runtime backend: "building" = optimizing the graph offline and saving it.

The engine file is the ONNX graph after ORT's full optimization pass for this machine's
providers (SessionOptions.optimized_model_filepath). Layout optimizations make it specific
to this CPU / provider set, which is why cache_key_parts names both. Loading it again runs
with graph optimizations disabled: the work was done at build time (ORT's "offline mode").

Threads default to 1 intra-op and 1 inter-op: gate timings must not depend on how busy
the other cores are, and on a Jetson the CPU is shared with the robot's own stack.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import numpy as np

from agent.engines import progress
from agent.engines.api import BuildError, EngineLoadError, InferenceError, UnsupportedError
from protocol.fsio import fsync_file
from protocol.manifest import BuildOptions
from protocol.modelio import ModelError, resolve_model_file

NAME = "onnxruntime"
_PROTOBUF_LIMIT = 2**31 - 2**20  # one serialized ONNX model, with room for the graph
_IR_WEIGHTS_NOT_INPUTS = 4  # from IR 4 on, initializers need not be graph inputs
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
BUILD_PHASE = "optimizing graph"  # what a BUILDING event says while ONNX Runtime builds


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def _cpu_identity() -> str:
    """CPU model + a hash of its feature flags: ORT's kernels and layouts depend on both."""
    model, flags = platform.processor() or "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return f"{model or 'unknown'}/{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


class OrtEngine:
    """An InferenceSession over an optimized model; `infer` takes and returns named arrays."""

    def __init__(self, session: Any, providers: list[str]) -> None:
        self._session = session
        self.providers = providers
        self.input_names = [i.name for i in session.get_inputs()]
        # Weights declared as inputs (protocol.modelio's `optional`): a caller may override them.
        self.optional_names = [i.name for i in session.get_overridable_initializers()]
        self.output_names = [o.name for o in session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        known = (*self.input_names, *self.optional_names)
        unknown = [n for n in feeds if n not in known]
        if missing or unknown:
            raise InferenceError(
                f"inputs do not match the model: missing {missing or 'none'}, "
                f"unknown {unknown or 'none'} (the model takes {self.input_names})"
            )
        try:
            outs = self._session.run(self.output_names, feeds)
        except Exception as e:  # ORT raises its own non-exported exception classes
            raise InferenceError(f"onnxruntime inference failed: {e}") from e
        return dict(zip(self.output_names, outs, strict=True))

    def device_memory_bytes(self) -> int:
        # On the CPU provider an engine holds no device memory, so 0 is the true figure
        # (host memory shows up in the process RSS). ORT does not expose the CUDA arena
        # size through Python either, so the CUDA/TensorRT providers also report 0.
        return 0

    def close(self) -> None:
        self._session = None


def _source(model_path: Path) -> str | bytes:
    """The model as ORT should build it: the file itself, or bytes when it needs one of two
    rewrites that leave its computation unchanged.

    - External data: the engine is one file, but ORT's optimized model keeps referring to
      the data files of the weights it did not rewrite, which stay behind in the bundle:
      the weights are inlined.
    - IR 3 (weights listed as graph inputs): ORT saves its optimized IR 3 model with the
      weights it created (fused, folded) missing from the inputs, which IR 3 forbids; the
      engine is then not valid ONNX. The weights are taken out of the inputs, as
      protocol.modelio reads them, and the model saved as IR 4, where that is the rule.
    """
    try:
        io = resolve_model_file(model_path)  # also refuses data files outside the model's dir
    except ModelError as e:
        raise (UnsupportedError if e.code == "unsupported" else BuildError)(e.reason) from e
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    legacy = model.ir_version < _IR_WEIGHTS_NOT_INPUTS and bool(io.optional)
    if not io.data_files and not legacy:
        return str(model_path)
    total = sum((model_path.parent / f).stat().st_size for f in io.data_files)
    if total >= _PROTOBUF_LIMIT:
        raise UnsupportedError(
            f"{model_path.name} has {total / 2**30:.1f} GiB of weights; an onnxruntime engine "
            "is one ONNX file, at most 2 GiB (TensorRT devices build such models)"
        )
    onnx.load_external_data_for_model(model, str(model_path.parent))
    if legacy:
        weights = [v for v in model.graph.input if v.name in io.optional]
        for v in weights:
            model.graph.input.remove(v)
        model.ir_version = _IR_WEIGHTS_NOT_INPUTS
    return bytes(model.SerializeToString())


class OnnxRuntimeBackend:
    """Backend protocol over ONNX Runtime, with providers chosen by config."""

    name = NAME

    def __init__(
        self,
        providers: list[str] | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        trt_ep_cache_dir: Path | None = None,
    ) -> None:
        ort = _ort()
        self.version = str(ort.__version__)
        available = list(ort.get_available_providers())
        wanted = list(providers) if providers else [CPU]
        absent = [p for p in wanted if p not in available]
        if absent:
            raise UnsupportedError(
                f"onnxruntime on this device lacks the execution provider(s) {absent}; "
                f"it has {available}"
            )
        if CPU not in wanted:
            wanted.append(CPU)  # every graph needs a home for the ops an EP does not take
        self.providers = wanted
        if intra_op_threads < 0 or inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0 (0 = onnxruntime's default)")
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.trt_ep_cache_dir = trt_ep_cache_dir

    def cache_key_parts(self) -> dict[str, str]:
        return {
            "providers": ",".join(self.providers),
            "machine": platform.machine(),
            "cpu": _cpu_identity(),
        }

    def _session_options(self, *, optimize_to: Path | None) -> Any:
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only: warnings go to stderr, not our logs
        if optimize_to is not None:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = str(optimize_to)
            # Without this ORT picks the format from the file name, and ours has no suffix.
            so.add_session_config_entry("session.save_model_format", "ONNX")
        else:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return so

    def _provider_list(self, options: BuildOptions | None) -> list[Any]:
        out: list[Any] = []
        for p in self.providers:
            if p == TRT_EP and options is not None:
                trt: dict[str, Any] = {"trt_fp16_enable": options.precision == "fp16"}
                if options.precision == "int8":
                    trt["trt_int8_enable"] = True
                if options.workspace_mb:
                    trt["trt_max_workspace_size"] = options.workspace_mb << 20
                if options.dla_core is not None:
                    trt["trt_dla_enable"] = True
                    trt["trt_dla_core"] = options.dla_core
                if options.profiles:
                    for field in ("min", "opt", "max"):
                        trt[f"trt_profile_{field}_shapes"] = ",".join(
                            f"{name}:{'x'.join(str(d) for d in getattr(prof, field))}"
                            for name, prof in options.profiles.items()
                        )
                if self.trt_ep_cache_dir is not None:
                    trt["trt_engine_cache_enable"] = True
                    trt["trt_engine_cache_path"] = str(self.trt_ep_cache_dir)
                    trt["trt_timing_cache_enable"] = True
                out.append((p, trt))
            else:
                out.append(p)
        return out

    def build(self, model_path: Path, options: BuildOptions, out_path: Path) -> None:
        # Precision was fixed when the bundle was built (fp16 / Q/DQ models run as they
        # are), so the build options only matter to the TensorRT provider.
        # A DLA core is a placement hint: only the TensorRT provider can act on it.
        ort = _ort()
        if not model_path.is_file():
            raise BuildError(f"model file {model_path} does not exist")
        # ONNX Runtime has one build phase and no steps: its start and its end.
        progress.report(BUILD_PHASE, 0.0)
        source = _source(model_path)
        try:
            if out_path.exists():
                out_path.unlink()
            ort.InferenceSession(
                source,
                sess_options=self._session_options(optimize_to=out_path),
                providers=self._provider_list(options),
            )
        except Exception as e:
            raise BuildError(f"onnxruntime could not build {model_path.name}: {e}") from e
        progress.report(BUILD_PHASE, 1.0)
        if not out_path.is_file():
            raise BuildError(f"onnxruntime did not write the optimized model {out_path}")
        fsync_file(out_path)

    def load(self, engine_path: Path, providers: list[str] | None = None) -> OrtEngine:
        ort = _ort()
        try:
            session = ort.InferenceSession(
                str(engine_path),
                sess_options=self._session_options(optimize_to=None),
                providers=self._provider_list(None) if providers is None else providers,
            )
        except Exception as e:
            raise EngineLoadError(f"onnxruntime could not load engine {engine_path}: {e}") from e
        return OrtEngine(session, list(session.get_providers()))
