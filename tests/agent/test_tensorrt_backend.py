"""TensorRT backend on a real GPU: build, cache, run, profiles, precision policy.

Runs where `tensorrt` and pycuda import (a Jetson, or an NVIDIA GPU host); skipped with
that reason elsewhere. The precision policy itself is tested everywhere in
test_engines_precision.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import structlog.testing
from onnx import TensorProto, helper

trt = pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed here (needs a Jetson or an NVIDIA GPU host)"
)
pytest.importorskip("pycuda", reason="pycuda is not installed here (build it from its sdist)")

from agent.engines import (  # noqa: E402
    BuildError,
    InferenceError,
    UnsupportedError,
    load_engine,
    select_backend,
)
from agent.engines.cache import EngineCache  # noqa: E402
from protocol.manifest import BuildOptions, Profile  # noqa: E402
from tests.models import (  # noqa: E402
    convnet_inputs,
    make_convnet,
    make_golden,
    make_mlp,
    mlp_inputs,
)

pytestmark = pytest.mark.tensorrt

PROFILE = {"x": Profile(min=[1, 64], opt=[8, 64], max=[32, 64])}


def test_fp32_engine_matches_the_onnxruntime_reference(tmp_path: Path) -> None:
    backend = select_backend("tensorrt", timing_cache_dir=tmp_path / "tc")
    model = make_mlp(tmp_path / "m.onnx")
    golden = make_golden(model, mlp_inputs(batch=8))
    cache = EngineCache(tmp_path / "engines", 1 << 30)
    path = cache.get_or_build(backend, model, "a" * 64, BuildOptions(profiles=PROFILE))
    engine = load_engine(path)
    try:
        for batch in (1, 8, 32):
            out = engine.infer(mlp_inputs(batch=batch))["y"]
            assert out.shape == (batch, 16)
        out = engine.infer(mlp_inputs(batch=8))["y"]
        np.testing.assert_allclose(out, golden["output.y"], rtol=1e-3, atol=1e-3)
        assert engine.device_memory_bytes() > 0
    finally:
        engine.close()
    assert list((tmp_path / "tc").glob("timing-*.cache")), "the timing cache is kept on disk"


def test_shape_outside_the_profile_is_refused(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    model = make_mlp(tmp_path / "m.onnx")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
        backend, model, "b" * 64, BuildOptions(profiles=PROFILE)
    )
    with pytest.raises(InferenceError, match="outside"):
        load_engine(path).infer(mlp_inputs(batch=64))


def test_dynamic_input_without_profile_fails_the_build_naming_it(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    model = make_mlp(tmp_path / "m.onnx")
    with pytest.raises(BuildError, match=r"'x'.*profiles"):
        EngineCache(tmp_path / "e", 1 << 30).get_or_build(backend, model, "c" * 64,
                                                          BuildOptions())  # fmt: skip


CONV_PROFILE = {"image": Profile(min=[1, 3, 32, 32], opt=[2, 3, 32, 32], max=[4, 3, 32, 32])}


def test_an_fp32_bundle_for_dla_runs_on_the_gpu_and_says_so(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    model = make_convnet(tmp_path / "c.onnx")
    feeds = convnet_inputs(batch=2)
    golden = make_golden(model, feeds)
    with structlog.testing.capture_logs() as logs:
        path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
            backend, model, "d" * 64, BuildOptions(profiles=CONV_PROFILE, dla_core=0)
        )
    not_used = [e for e in logs if e["event"] == "tensorrt_dla_not_used"]
    assert len(not_used) == 1 and not_used[0]["placement"].startswith("gpu (")
    built = [e for e in logs if e["event"] == "tensorrt_built"]
    assert built[0]["placement"].startswith("gpu") and built[0]["workspace"] > 0
    out = load_engine(path).infer(feeds)["logits"]
    np.testing.assert_allclose(out, golden["output.logits"], rtol=1e-3, atol=1e-3)


def test_a_plan_for_dla_core_1_runs_on_core_1(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    if backend.dla_cores < 2:  # type: ignore[attr-defined]
        pytest.skip(f"this device has {backend.dla_cores} DLA cores")  # type: ignore[attr-defined]
    model = make_convnet(tmp_path / "c.onnx")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
        backend, model, "f" * 64,
        BuildOptions(profiles=CONV_PROFILE, dla_core=1, precision="fp16"),
    )  # fmt: skip
    engine = load_engine(path)
    try:
        assert engine.dla_core == 1  # type: ignore[attr-defined]
        assert engine.infer(convnet_inputs(batch=2))["logits"].shape[0] == 2
    finally:
        engine.close()


def test_int8_without_qdq_is_unsupported_before_building(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    model = make_mlp(tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match="Q/DQ"):
        EngineCache(tmp_path / "e", 1 << 30).get_or_build(
            backend, model, "e" * 64, BuildOptions(precision="int8", profiles=PROFILE)
        )


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _nonzero_model(path: Path) -> Path:
    """y = NonZero(x > 0): the output's second dimension depends on the data."""
    zero = helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=zero),
        helper.make_node("Greater", ["x", "zero"], ["positive"]),
        helper.make_node("NonZero", ["positive"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "nonzero", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, "hits"])],
    )  # fmt: skip
    return _save(graph, path)


def test_an_output_whose_shape_depends_on_the_data_is_returned_whole(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
        backend, _nonzero_model(tmp_path / "nz.onnx"), "1" * 64, BuildOptions()
    )
    engine = load_engine(path)
    try:
        for hits in (3, 16, 0, 7):
            x = np.full(16, -1.0, dtype=np.float32)
            x[:hits] = 1.0
            y = engine.infer({"x": x})["y"]
            assert y.shape == (1, hits)
            assert y.reshape(-1).tolist() == list(range(hits))
    finally:
        engine.close()


def test_a_shape_tensor_input_is_refused_naming_it(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )  # fmt: skip
    model = _save(graph, tmp_path / "r.onnx")
    with pytest.raises(UnsupportedError, match=r"input 'shape' is a shape tensor"):
        EngineCache(tmp_path / "e", 1 << 30).get_or_build(
            select_backend("tensorrt"), model, "2" * 64, BuildOptions()
        )


def test_bf16_outputs_are_refused_at_load_as_unsupported(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)], "bf16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4])],
    )  # fmt: skip
    model = _save(graph, tmp_path / "b.onnx")
    try:
        path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
            select_backend("tensorrt"), model, "3" * 64, BuildOptions()
        )
    except BuildError as e:
        pytest.skip(f"this TensorRT does not build bf16 I/O: {e.reason}")
    with pytest.raises(UnsupportedError, match=r"'y' is .*no numpy type"):
        load_engine(path)


def test_the_bundled_plugins_are_registered_before_any_parse() -> None:
    select_backend("tensorrt")
    registry = trt.get_plugin_registry()
    assert registry.get_creator("EfficientNMS_TRT", "1", "") is not None


def test_dla_cores_are_counted_without_a_builder_and_gpu_time_is_measured(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    assert backend.dla_cores >= 0  # type: ignore[attr-defined]
    model = make_mlp(tmp_path / "m.onnx")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
        backend, model, "4" * 64, BuildOptions(profiles=PROFILE)
    )
    engine = load_engine(path)
    engine.infer(mlp_inputs(batch=4))
    assert engine.last_gpu_ms is not None and engine.last_gpu_ms > 0  # type: ignore[attr-defined]
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(InferenceError, match="closed"):
        engine.infer(mlp_inputs(batch=4))


def test_a_foreign_timing_cache_does_not_stop_a_build(tmp_path: Path) -> None:
    tc = tmp_path / "tc"
    backend = select_backend("tensorrt", timing_cache_dir=tc)
    tc.mkdir()
    for name in ("a", "b"):
        (tc / f"timing-trt{backend.version}-{name}.cache").write_bytes(b"not a timing cache")
    model = make_mlp(tmp_path / "m.onnx")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
        backend, model, "5" * 64, BuildOptions(profiles=PROFILE)
    )
    assert load_engine(path).infer(mlp_inputs(batch=2))["y"].shape == (2, 16)
