"""The TensorRT backend's fail-closed paths and build settings, without TensorRT or a GPU.

agent/engines/tensorrt_backend.py and cuda_buffers.py run unchanged; only the Jetson's
TensorRT and pycuda are replaced by tests/agent/fake_jetson.py, which records what the real
ones make hard to see (handles destroyed outside the CUDA context, host syncs, DLA core).
The same behaviours run against the real TensorRT in test_tensorrt_backend.py on a Jetson.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import structlog.testing

from agent.engines import (
    BuildError,
    EngineLoadError,
    InferenceError,
    UnsupportedError,
    load_engine,
    select_backend,
)
from agent.engines.api import EngineMeta
from agent.engines.cache import EngineCache
from agent.engines.sidecar import write_meta
from agent.engines.tensorrt_backend import default_workspace_bytes
from agent.hardware import meminfo_bytes
from agent.runtime import ModelRuntime
from protocol.fsio import sha256_file
from protocol.manifest import BuildOptions, Profile
from tests.agent import fake_jetson
from tests.agent.fake_jetson import REC, plan
from tests.models import make_convnet, make_mlp

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda")),
    reason="the real TensorRT/pycuda are here: test_tensorrt_backend.py covers these",
)

X = {"name": "x", "mode": "input", "dtype": "FLOAT", "shape": [-1, 4]}
DOUBLE = {"name": "y", "mode": "output", "dtype": "FLOAT", "shape": [-1, 4], "op": "double"}
NONZERO = {"name": "idx", "mode": "output", "dtype": "INT64", "shape": [1, -1], "op": "nonzero"}


@pytest.fixture(autouse=True)
def jetson(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, mod in (("tensorrt", fake_jetson.tensorrt), ("pycuda", fake_jetson.pycuda),
                      ("pycuda.driver", fake_jetson.driver)):  # fmt: skip
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    REC.reset()
    yield
    assert REC.leaks == [], "CUDA handles destroyed outside the CUDA context"


def _engine_file(root: Path, plan_bytes: bytes, *, dla_core: int | None = None) -> Path:
    path = root / "engine"
    path.write_bytes(plan_bytes)
    meta = EngineMeta("tensorrt", "10.3.0", sha256_file(path), "k" * 64,
                      extra={"build": {"dla_core": dla_core}})  # fmt: skip
    write_meta(path, meta)
    return path


def _live_handles() -> dict[str, int]:
    return {k: v for k, v in REC.live.items() if v}


def test_an_execution_context_tensorrt_cannot_create_is_a_load_failure(tmp_path: Path) -> None:
    path = _engine_file(tmp_path, plan(X, DOUBLE, context="none"))
    with pytest.raises(EngineLoadError, match="could not create an execution context"):
        load_engine(path)
    assert _live_handles() == {}


def test_bf16_io_is_unsupported_and_releases_what_was_made(tmp_path: Path) -> None:
    bf16 = {**DOUBLE, "dtype": "BF16"}
    with pytest.raises(UnsupportedError, match=r"'y' is DataType.BF16, which has no numpy type"):
        load_engine(_engine_file(tmp_path, plan(X, bf16)))
    assert _live_handles() == {}


@pytest.mark.parametrize("kind", ["Stream", "Event"])
def test_pycuda_failing_mid_load_is_a_load_error_and_nothing_leaks(
    tmp_path: Path, kind: str
) -> None:
    REC.fail_next[kind] = MemoryError("cuStreamCreate failed: out of memory")
    with pytest.raises(EngineLoadError, match="MemoryError: cuStreamCreate failed"):
        load_engine(_engine_file(tmp_path, plan(X, DOUBLE)))
    assert _live_handles() == {}


def test_a_shape_tensor_input_is_refused_at_load(tmp_path: Path) -> None:
    shape_in = {"name": "shape", "mode": "input", "dtype": "INT64", "shape": [2],
                "shape_tensor": True}  # fmt: skip
    with pytest.raises(UnsupportedError, match="input 'shape' is a shape tensor"):
        load_engine(_engine_file(tmp_path, plan(X, shape_in, DOUBLE)))


def test_close_releases_stream_events_and_buffers_inside_the_context(tmp_path: Path) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, DOUBLE)))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(engine.infer({"x": x})["y"], 2 * x)
    assert _live_handles() == {"Stream": 1, "Event": 2, "DeviceAllocation": 2}
    engine.close()
    assert _live_handles() == {}  # and none outside the context (the fixture checks)
    engine.close()
    with pytest.raises(InferenceError, match="closed"):
        engine.infer({"x": x})


def test_outputs_whose_shape_depends_on_the_data_are_returned_whole(tmp_path: Path) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, NONZERO)))
    try:
        for hits in (3, 8, 0, 5):
            x = np.full((2, 4), -1.0, dtype=np.float32)
            x.reshape(-1)[:hits] = 1.0
            idx = engine.infer({"x": x})["idx"]
            assert idx.shape == (1, hits) and idx.reshape(-1).tolist() == list(range(hits))
    finally:
        engine.close()


def test_one_host_sync_per_inference_after_the_output_copies(tmp_path: Path) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, DOUBLE)))
    try:
        REC.ops.clear()
        engine.infer({"x": np.ones((1, 4), np.float32)})
        syncs = [i for i, op in enumerate(REC.ops) if op.endswith("synchronize")]
        assert REC.ops[syncs[0]] == "stream.synchronize"
        assert syncs[0] > max(i for i, op in enumerate(REC.ops) if op == "memcpy_dtoh")
        assert engine.last_gpu_ms == 0.25  # type: ignore[attr-defined]
    finally:
        engine.close()


def test_the_dla_core_of_the_build_is_set_on_the_runtime_before_deserializing(
    tmp_path: Path,
) -> None:
    engine = load_engine(_engine_file(tmp_path, plan(X, DOUBLE), dla_core=1))
    try:
        assert engine.dla_core == 1  # type: ignore[attr-defined]
        assert REC.runtimes[-1].DLA_core == 1
    finally:
        engine.close()


def test_plugins_are_registered_once_per_process_before_any_plan_is_deserialized() -> None:
    # The fake runtime, like the real one, cannot deserialize a plugin plan before that.
    select_backend("tensorrt")
    select_backend("tensorrt")
    assert REC.plugin_registrations == 1


def test_dla_cores_are_counted_by_the_runtime_not_a_builder() -> None:
    backend = select_backend("tensorrt")
    assert backend.cache_key_parts()["dla_cores"] == "2"
    assert REC.builders == 0  # seconds and hundreds of MB on an Orin, for every job


def test_a_log_handler_that_raises_inside_tensorrt_does_not_escape(tmp_path: Path) -> None:
    from agent.engines.tensorrt_backend import _get_logger

    closed = io.StringIO()
    closed.close()  # e.g. the journal's pipe went away: every write raises ValueError
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=closed))
    try:
        _get_logger().log(fake_jetson.ILogger.Severity.ERROR, "Plugin not found")
    finally:
        structlog.reset_defaults()


def test_the_runtime_keeps_serving_when_a_new_tensorrt_engine_cannot_get_a_context(
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "models" / "det"
    for version, context in (("1.0.0", "ok"), ("2.0.0", "none")):
        vdir = model_dir / "versions" / version
        vdir.mkdir(parents=True)
        _engine_file(vdir, plan(X, DOUBLE, context=context))
    (model_dir / "current").symlink_to("versions/1.0.0")
    x = np.ones((1, 4), np.float32)
    with ModelRuntime("det", tmp_path, report=False, check_interval_s=0.0) as rt:
        (model_dir / "current").unlink()
        (model_dir / "current").symlink_to("versions/2.0.0")
        assert rt.refresh(wait=True) is False
        for _ in range(20):
            np.testing.assert_array_equal(rt.infer({"x": x})["y"], 2 * x)
        assert rt.version == "1.0.0"
    assert len(REC.runtimes) == 2, "the failed version was loaded once, not retried"
    assert json.loads((model_dir / "versions/2.0.0/engine").read_bytes())["context"] == "none"


# -- build ---------------------------------------------------------------------------------

CONV_PROFILE = {"image": Profile(min=[1, 3, 32, 32], opt=[2, 3, 32, 32], max=[4, 3, 32, 32])}
MLP_PROFILE = {"x": Profile(min=[1, 64], opt=[8, 64], max=[32, 64])}


def _build(tmp_path: Path, model: Path, options: BuildOptions, **backend: Any) -> Any:
    cache = EngineCache(tmp_path / "engines", 1 << 30)
    cache.get_or_build(select_backend("tensorrt", **backend), model, "a" * 64, options)
    return REC.configs[-1]


def _qdq_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_int8_build_on_10x_also_allows_fp16(tmp_path: Path) -> None:
    config = _build(tmp_path, _qdq_model(tmp_path / "q.onnx"), BuildOptions(precision="int8"))
    assert config.flags == {"INT8", "FP16"}


def test_a_build_without_workspace_mb_is_capped_by_free_memory(tmp_path: Path) -> None:
    config = _build(tmp_path, make_mlp(tmp_path / "m.onnx"), BuildOptions(profiles=MLP_PROFILE))
    free = max(2 << 30, meminfo_bytes("MemAvailable") or 0)  # the fake GPU is integrated
    # MemAvailable moves between two reads: a few MB either way is the same cap.
    assert abs(config.pool_limits["WORKSPACE"] - default_workspace_bytes(free)) < 64 << 20
    config = _build(tmp_path, make_mlp(tmp_path / "m2.onnx", seed=2),
                    BuildOptions(profiles=MLP_PROFILE, workspace_mb=256))  # fmt: skip
    assert config.pool_limits == {"WORKSPACE": 256 << 20}


def test_an_fp32_bundle_for_dla_is_built_for_the_gpu_with_a_warning(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        config = _build(tmp_path, make_convnet(tmp_path / "c.onnx"),
                        BuildOptions(profiles=CONV_PROFILE, dla_core=1))  # fmt: skip
    assert config.default_device_type.value == "GPU" and "GPU_FALLBACK" not in config.flags
    [warning] = [e for e in logs if e["event"] == "tensorrt_dla_not_used"]
    assert "fp16/int8 only" in warning["placement"]


def test_an_fp16_bundle_for_dla_core_1_says_how_many_layers_can_run_there(
    tmp_path: Path,
) -> None:
    with structlog.testing.capture_logs() as logs:
        options = BuildOptions(profiles=CONV_PROFILE, dla_core=1, precision="fp16")
        config = _build(tmp_path, make_convnet(tmp_path / "c.onnx"), options)
    assert (config.default_device_type.value, config.DLA_core) == ("DLA", 1)
    assert config.flags == {"FP16", "GPU_FALLBACK"}
    [built] = [e for e in logs if e["event"] == "tensorrt_built"]
    assert built["placement"].startswith("dla1+gpu_fallback: ")
    assert "layers can run on DLA" in built["placement"]


def test_a_foreign_timing_cache_is_replaced_not_fatal(tmp_path: Path) -> None:
    tc = tmp_path / "tc"
    tc.mkdir()
    cache_file = tc / "timing-trt10.3.0-orin-nvgpu-sm8.7.cache"
    cache_file.write_bytes(b"a cache from TensorRT 10.7 on a Thor")
    with structlog.testing.capture_logs() as logs:
        config = _build(tmp_path, make_mlp(tmp_path / "m.onnx"),
                        BuildOptions(profiles=MLP_PROFILE), timing_cache_dir=tc)  # fmt: skip
    assert "tensorrt_timing_cache_rejected" in [e["event"] for e in logs]
    assert config.timing_cache is not None and not config.timing_cache.foreign
    assert cache_file.read_bytes().startswith(b"fake-timing-cache-10.3.0")


def test_a_shape_tensor_input_is_refused_at_build(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )  # fmt: skip
    path = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedError, match="input 'shape' is a shape tensor"):
        _build(tmp_path, path, BuildOptions())


def test_the_onnx_parser_outlives_the_build_that_reads_its_weights(tmp_path: Path) -> None:
    _build(tmp_path, make_mlp(tmp_path / "m.onnx"), BuildOptions(profiles=MLP_PROFILE))


# -- build progress, memory, layer placement ----------------------------------------------


@pytest.fixture
def reports() -> Iterator[list[tuple[str, float]]]:
    from agent.engines import progress

    got: list[tuple[str, float]] = []
    progress.set_sink(lambda phase, fraction: got.append((phase, fraction)))
    yield got
    progress.set_sink(None)


def test_a_build_reports_tensorrt_phases_as_top_level_progress(
    tmp_path: Path, reports: list[tuple[str, float]]
) -> None:
    _build(tmp_path, make_mlp(tmp_path / "m.onnx"), BuildOptions(profiles=MLP_PROFILE))
    assert [p for p, _ in itertools.groupby(p for p, _ in reports)] == [
        "Building engine", "Serializing",
    ]  # fmt: skip
    building = [f for p, f in reports if p == "Building engine"]
    assert building[0] == 0.0 and building[-1] == 1.0
    assert building == sorted(building)
    # The nested "Tactic selection" phase moves its parent between two of its steps.
    assert any(1 / 3 < f < 2 / 3 for f in building)


def test_a_build_that_finds_no_implementation_says_it_is_usually_memory(tmp_path: Path) -> None:
    REC.build_error = (
        "[optimizer.cpp::computeCosts::3728] Error Code 10: Internal Error (Could not find "
        "any implementation for node /conv1/Conv.)"
    )
    with pytest.raises(BuildError) as e:
        _build(tmp_path, make_mlp(tmp_path / "m.onnx"),
               BuildOptions(profiles=MLP_PROFILE, workspace_mb=64))  # fmt: skip
    assert "Could not find any implementation for node /conv1/Conv." in e.value.reason
    assert re.search(
        r"usually means the build ran out of memory: the workspace was capped at 64 MiB "
        r"with \d+ MiB free", e.value.reason
    )  # fmt: skip
    REC.build_error = "Network has dynamic or shape inputs, but no optimization profile"
    with pytest.raises(BuildError) as e:
        _build(tmp_path, make_mlp(tmp_path / "m2.onnx", seed=2), BuildOptions(profiles=MLP_PROFILE))
    assert "memory" not in e.value.reason


def test_a_manifest_workspace_above_half_the_free_memory_is_capped_there(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        config = _build(tmp_path, make_mlp(tmp_path / "m.onnx"),
                        BuildOptions(profiles=MLP_PROFILE, workspace_mb=1 << 24))  # fmt: skip
    free = max(2 << 30, meminfo_bytes("MemAvailable") or 0)
    assert abs(config.pool_limits["WORKSPACE"] - default_workspace_bytes(free)) < 64 << 20
    assert "tensorrt_workspace_capped" in [e["event"] for e in logs]


def _conv_golden(tmp_path: Path, model: Path) -> Path:
    from tests.models import convnet_inputs, make_golden, write_golden

    return write_golden(tmp_path / "golden.npz", make_golden(model, convnet_inputs(2)))


def test_a_dla_build_counts_its_gpu_layers_and_the_gate_refuses_past_the_limit(
    tmp_path: Path,
) -> None:
    from agent.gate import run_gate
    from protocol.manifest import GateSpec

    model = make_convnet(tmp_path / "c.onnx")
    backend = select_backend("tensorrt")
    options = BuildOptions(profiles=CONV_PROFILE, dla_core=1, precision="fp16")
    engine_file = EngineCache(tmp_path / "engines", 1 << 30).get_or_build(
        backend, model, "a" * 64, options
    )
    assert REC.configs[-1].profiling_verbosity.value == "DETAILED"
    engine = load_engine(engine_file)
    try:  # Conv, Relu, Conv, Relu fuse into one DLA layer; pooling, flatten, gemm stay
        assert engine.layer_placement() == {"dla": 1, "gpu": 3}  # type: ignore[attr-defined]
    finally:
        engine.close()
    golden = _conv_golden(tmp_path, model)
    result = run_gate(backend, engine_file, None, golden, GateSpec(max_gpu_fallback_layers=2))
    assert (result.passed, result.code) == (False, "gpu_fallback")
    assert result.reason == (
        "3 of the engine's 4 layers run on the GPU (1 on the DLA), more than the "
        "max_gpu_fallback_layers of 2"
    )
    assert result.figures["layers"] == {"dla": 1, "gpu": 3}
    assert _live_handles() == {}


def test_a_gpu_build_counts_every_layer_on_the_gpu_from_layer_names(tmp_path: Path) -> None:
    engine_file = EngineCache(tmp_path / "engines", 1 << 30).get_or_build(
        select_backend("tensorrt"), make_convnet(tmp_path / "c.onnx"), "a" * 64,
        BuildOptions(profiles=CONV_PROFILE, precision="fp16"),
    )  # fmt: skip
    assert REC.configs[-1].profiling_verbosity.value == "LAYER_NAMES_ONLY"  # no detail cost
    engine = load_engine(engine_file)
    try:
        assert engine.layer_placement() == {"dla": 0, "gpu": 7}  # type: ignore[attr-defined]
    finally:
        engine.close()


def test_a_dla_plan_without_layer_detail_cannot_pass_a_fallback_limit(tmp_path: Path) -> None:
    from agent.gate import run_gate
    from protocol.manifest import GateSpec

    names_only = json.loads(plan(X, DOUBLE))
    names_only["layers"] = ["{ForeignNode[conv_0...relu_3]}", "gemm_6"]
    engine_file = _engine_file(tmp_path, json.dumps(names_only).encode(), dla_core=0)
    golden = _conv_golden(tmp_path, make_convnet(tmp_path / "c.onnx"))
    backend = select_backend("tensorrt")
    result = run_gate(backend, engine_file, None, golden, GateSpec(max_gpu_fallback_layers=5))
    assert (result.passed, result.code) == (False, "gpu_fallback")
    assert "cannot be checked" in (result.reason or "")
