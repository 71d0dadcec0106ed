"""TensorRT backend on a real GPU: build, cache, run, profiles, precision policy.

Runs where `tensorrt` and pycuda import (a Jetson, or an NVIDIA GPU host); skipped with
that reason elsewhere. The precision policy itself is tested everywhere in
test_engines_precision.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip(
    "tensorrt", reason="TensorRT is not installed here (needs a Jetson or an NVIDIA GPU host)"
)
pytest.importorskip("pycuda", reason="pycuda is not installed here (build it from its sdist)")

from agent.engines import UnsupportedError, load_engine, select_backend  # noqa: E402
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
    from agent.engines import InferenceError

    backend = select_backend("tensorrt")
    model = make_mlp(tmp_path / "m.onnx")
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
        backend, model, "b" * 64, BuildOptions(profiles=PROFILE)
    )
    with pytest.raises(InferenceError, match="outside"):
        load_engine(path).infer(mlp_inputs(batch=64))


def test_dynamic_input_without_profile_fails_the_build_naming_it(tmp_path: Path) -> None:
    from agent.engines import BuildError

    backend = select_backend("tensorrt")
    model = make_mlp(tmp_path / "m.onnx")
    with pytest.raises(BuildError, match=r"'x'.*profiles"):
        EngineCache(tmp_path / "e", 1 << 30).get_or_build(backend, model, "c" * 64,
                                                          BuildOptions())  # fmt: skip


def test_static_convnet_builds_and_dla_request_falls_back_to_gpu(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    model = make_convnet(tmp_path / "c.onnx")
    feeds = convnet_inputs(batch=2)
    golden = make_golden(model, feeds)
    prof = {"image": Profile(min=[1, 3, 32, 32], opt=[2, 3, 32, 32], max=[4, 3, 32, 32])}
    path = EngineCache(tmp_path / "e", 1 << 30).get_or_build(
        backend, model, "d" * 64, BuildOptions(profiles=prof, dla_core=0, precision="fp32")
    )
    out = load_engine(path).infer(feeds)["logits"]
    np.testing.assert_allclose(out, golden["output.logits"], rtol=1e-3, atol=1e-3)


def test_int8_without_qdq_is_unsupported_before_building(tmp_path: Path) -> None:
    backend = select_backend("tensorrt")
    model = make_mlp(tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match="Q/DQ"):
        EngineCache(tmp_path / "e", 1 << 30).get_or_build(
            backend, model, "e" * 64, BuildOptions(precision="int8", profiles=PROFILE)
        )
