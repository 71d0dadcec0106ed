"""The ONNX Runtime backend, select_backend and load_engine, on real ONNX models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.engines import (
    EngineLoadError,
    InferenceError,
    UnsupportedError,
    load_engine,
    select_backend,
)
from agent.engines.cache import EngineCache
from agent.engines.onnxruntime_backend import OnnxRuntimeBackend
from agent.engines.sidecar import sidecar_path
from protocol.manifest import BuildOptions
from tests.models import convnet_inputs, make_convnet, make_golden, make_mlp, mlp_inputs


@pytest.fixture
def backend() -> OnnxRuntimeBackend:
    b = select_backend("onnxruntime")
    assert isinstance(b, OnnxRuntimeBackend)
    return b


def test_auto_selects_onnxruntime_where_tensorrt_is_absent() -> None:
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: auto would pick it")
    except ImportError:
        pass
    assert select_backend("auto").name == "onnxruntime"


def test_unknown_backend_name_and_option_are_refused_with_the_choices() -> None:
    with pytest.raises(UnsupportedError, match="auto, tensorrt, onnxruntime"):
        select_backend("openvino")
    with pytest.raises(UnsupportedError, match="no option"):
        select_backend("onnxruntime", workspace_gb=4)
    # The other backend's options are not typos: one config serves both backends.
    assert select_backend("onnxruntime", timing_cache_dir=Path("/tmp/tc")).name == "onnxruntime"


def test_absent_execution_provider_is_refused_naming_what_exists() -> None:
    with pytest.raises(UnsupportedError, match="CUDAExecutionProvider"):
        select_backend("onnxruntime", providers=["CUDAExecutionProvider"])


def test_tensorrt_backend_is_refused_clearly_where_tensorrt_is_absent() -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(UnsupportedError, match="tensorrt"):
        select_backend("tensorrt")


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_built_engine_reproduces_the_fp32_reference_outputs(
    tmp_path: Path, backend: OnnxRuntimeBackend, kind: str
) -> None:
    if kind == "mlp":
        model, feeds = make_mlp(tmp_path / "m.onnx"), mlp_inputs(batch=4)
    else:
        model, feeds = make_convnet(tmp_path / "m.onnx"), convnet_inputs(batch=2)
    golden = make_golden(model, feeds)
    cache = EngineCache(tmp_path / "engines", 1 << 30)
    engine_file = cache.get_or_build(backend, model, "0" * 64, BuildOptions())
    engine = load_engine(engine_file)
    try:
        out = engine.infer(feeds)
        for name, value in out.items():
            np.testing.assert_allclose(value, golden[f"output.{name}"], rtol=1e-5, atol=1e-5)
        # The CPU provider holds no device memory: 0 is the true figure, not a placeholder.
        assert engine.device_memory_bytes() == 0
    finally:
        engine.close()
    meta = json.loads(sidecar_path(engine_file).read_text())
    assert meta["backend"] == "onnxruntime" and meta["backend_version"] == backend.version


def test_dynamic_batch_engine_accepts_other_batch_sizes(
    tmp_path: Path, backend: OnnxRuntimeBackend
) -> None:
    model = make_mlp(tmp_path / "m.onnx")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(backend, model, "1" * 64,
                                                             BuildOptions())  # fmt: skip
    engine = load_engine(path)
    for batch in (1, 3, 17):
        assert engine.infer(mlp_inputs(batch=batch))["y"].shape == (batch, 16)


def test_wrong_input_names_and_dtypes_get_a_specific_error(
    tmp_path: Path, backend: OnnxRuntimeBackend
) -> None:
    model = make_mlp(tmp_path / "m.onnx")
    engine = load_engine(
        EngineCache(tmp_path / "e", 1 << 30).get_or_build(backend, model, "2" * 64, BuildOptions())
    )
    with pytest.raises(InferenceError, match=r"missing \['x'\].*unknown \['image'\]"):
        engine.infer({"image": np.zeros((1, 64), np.float32)})
    with pytest.raises(InferenceError, match="onnxruntime inference failed"):
        engine.infer({"x": np.zeros((1, 64), np.float64)})


def test_a_model_that_is_not_onnx_fails_the_build_with_its_name(
    tmp_path: Path, backend: OnnxRuntimeBackend
) -> None:
    from agent.engines import BuildError

    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x08\x01 definitely not a protobuf graph")
    cache = EngineCache(tmp_path / "e", 1 << 30)
    with pytest.raises(BuildError, match=r"garbage\.onnx"):
        cache.get_or_build(backend, bad, "3" * 64, BuildOptions())
    assert cache.entries() == []
    assert [p.name for p in (tmp_path / "e").iterdir() if not p.name.startswith(".lock")] == []


def test_engine_without_sidecar_or_with_foreign_backend_is_not_loaded(
    tmp_path: Path, backend: OnnxRuntimeBackend
) -> None:
    model = make_mlp(tmp_path / "m.onnx")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(backend, model, "4" * 64,
                                                             BuildOptions())  # fmt: skip
    lone = tmp_path / "engine"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(EngineLoadError, match="no sidecar"):
        load_engine(lone)
    meta = json.loads(sidecar_path(path).read_text())
    meta["backend"] = "openvino"
    sidecar_path(lone).write_text(json.dumps(meta))
    with pytest.raises(EngineLoadError, match="unknown backend 'openvino'"):
        load_engine(lone)


def test_a_weight_declared_as_an_input_is_optional_and_may_be_overridden(
    tmp_path: Path, backend: OnnxRuntimeBackend
) -> None:
    from tests.modelzoo import optional_input

    cache = EngineCache(tmp_path / "e", 1 << 30)
    engine = backend.load(
        cache.get_or_build(backend, optional_input(tmp_path), "4" * 64, BuildOptions())
    )
    features = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    default = engine.infer({"features": features})["probs"]
    hotter = engine.infer({"features": features, "temperature": np.array([8.0], np.float32)})
    assert not np.allclose(default, hotter["probs"])  # the override took effect
    with pytest.raises(InferenceError, match="missing \\['features'\\]"):
        engine.infer({"temperature": np.array([8.0], np.float32)})


@pytest.mark.parametrize("make", ["resnet_ir3", "squeezenet_ir3"])
def test_the_engine_of_an_ir3_model_is_valid_onnx_whose_only_inputs_are_the_real_ones(
    make: str, tmp_path: Path, backend: OnnxRuntimeBackend
) -> None:
    """IR 3 lists every weight as an input. ORT's optimized IR 3 model left the weights it
    fused out of the inputs (invalid IR 3: a stricter reader sees dangling tensors) and
    kept the others there: the engine disagreed with the model on what its inputs are."""
    import onnx

    from protocol.modelio import resolve_model_file
    from tests import modelzoo

    model = getattr(modelzoo, make)(tmp_path)
    engine = tmp_path / "engine"
    backend.build(model, BuildOptions(), engine)
    onnx.checker.check_model(str(engine))
    built = onnx.load(str(engine))
    assert [v.name for v in built.graph.input] == [t.name for t in resolve_model_file(model).inputs]
