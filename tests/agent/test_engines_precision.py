"""The TensorRT precision policy (pure: runs without TensorRT), on real ONNX models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.engines import UnsupportedError
from agent.engines.precision import builder_flags, check_precision, dla_core_to_use, model_traits
from agent.engines.tensorrt_backend import default_workspace_bytes
from tests.models import make_mlp


def _fp16_model(path: Path) -> Path:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float16), "w")
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["xh", "w"], ["yh"]),
        helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT),
    ]
    g = helper.make_graph(
        nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w],
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _qdq_model(path: Path) -> Path:
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_traits_are_read_from_the_model_itself(tmp_path: Path) -> None:
    assert model_traits(make_mlp(tmp_path / "fp32.onnx")) == set()
    assert model_traits(_fp16_model(tmp_path / "fp16.onnx")) == {"fp16"}
    assert model_traits(_qdq_model(tmp_path / "qdq.onnx")) == {"qdq"}


def test_tensorrt_11_refuses_fp16_for_an_fp32_model_and_says_how_to_fix_it() -> None:
    with pytest.raises(UnsupportedError, match=r"strongly typed.*--precision fp16") as e:
        check_precision("fp16", "11.4.0", set())
    assert e.value.code == "unsupported"
    check_precision("fp16", "11.4.0", {"fp16"})  # fp16 in the model: fine
    check_precision("fp16", "10.3.0", set())  # 10.x: the FP16 builder flag does it


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_int8_needs_an_explicitly_quantized_model_on_every_tensorrt(version: str) -> None:
    with pytest.raises(UnsupportedError, match=r"Q/DQ.*--calibration"):
        check_precision("int8", version, set())
    check_precision("int8", version, {"qdq"})


@pytest.mark.parametrize(
    ("precision", "major", "flags"),
    [("fp32", 10, []), ("fp16", 10, ["FP16"]), ("int8", 10, ["INT8", "FP16"]),
     ("fp16", 11, []), ("int8", 11, [])],
)  # fmt: skip
def test_weakly_typed_int8_also_allows_fp16_and_strongly_typed_sets_no_flag(
    precision: str, major: int, flags: list[str]
) -> None:
    # int8 alone leaves every layer without Q/DQ nodes in fp32 (NVIDIA's samples set both).
    assert builder_flags(precision, major) == flags


def test_dla_is_used_only_for_a_core_that_exists_and_a_precision_it_runs() -> None:
    assert dla_core_to_use(None, 2, "fp16") == (None, "gpu")
    assert dla_core_to_use(1, 2, "fp16") == (1, "dla1+gpu_fallback")
    assert dla_core_to_use(0, 2, "int8") == (0, "dla0+gpu_fallback")
    core, where = dla_core_to_use(0, 2, "fp32")
    assert core is None and where.startswith("gpu") and "fp16/int8 only" in where
    core, where = dla_core_to_use(1, 0, "fp16")
    assert core is None and "this device has 0 DLA cores" in where


def test_the_default_build_workspace_is_half_the_free_memory_with_a_floor() -> None:
    # An Orin's GPU shares the robot's RAM: an uncapped build can starve its own service.
    assert default_workspace_bytes(6 << 30) == 3 << 30
    assert default_workspace_bytes(0) == 16 << 20
