"""protocol.modelio: the one model I/O resolution bundle build and devices share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from protocol.modelio import ModelError, resolve_model, shape_tensor_inputs

REPO = Path(__file__).resolve().parents[2]


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
    ir: int,
    functions: list[onnx.FunctionProto] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("local", 1)],
        functions=functions or [],
    )
    model.ir_version = ir
    return model


def _weights_as_inputs(ir: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 2]),
    ]
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], inputs, [w], ir)


@pytest.mark.parametrize("ir", [3, 8])
def test_weights_listed_as_graph_inputs_are_optional_never_fed(ir: int) -> None:
    io = resolve_model(_weights_as_inputs(ir))
    assert [t.name for t in io.inputs] == ["x"]
    assert io.optional == ["W"]
    assert [t.name for t in io.outputs] == ["y"]


def test_a_custom_op_inside_a_subgraph_is_refused_naming_op_and_domain() -> None:
    then = helper.make_graph(
        [helper.make_node("Magic", ["x"], ["t"], domain="com.acme", name="magic_1")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 2])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 2])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
    ]
    with pytest.raises(ModelError) as e:
        resolve_model(_model([node], inputs, [], 8))
    assert e.value.code == "unsupported"
    assert "op 'Magic' of domain 'com.acme' (node 'magic_1')" in e.value.reason


def test_an_op_the_model_defines_as_a_local_function_is_accepted() -> None:
    fn = helper.make_function(
        "local", "Double", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 13)],
    )  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])]
    node = helper.make_node("Double", ["x"], ["y"], domain="local")
    assert resolve_model(_model([node], inputs, [], 8, [fn])).inputs[0].name == "x"


@pytest.mark.parametrize("location", ["/etc/passwd", "../w.bin", "a/../../w.bin", "a\\w.bin", ""])
def test_weights_outside_the_models_directory_are_refused(location: str) -> None:
    model = _weights_as_inputs(8)
    onnx.external_data_helper.set_external_data(model.graph.initializer[0], location or "x")
    model.graph.initializer[0].external_data[0].value = location
    with pytest.raises(ModelError, match="W"):
        resolve_model(model)


def test_a_string_input_is_refused_naming_its_type() -> None:
    inputs = [helper.make_tensor_value_info("x", TensorProto.STRING, [1, 2])]
    with pytest.raises(ModelError, match="'x' has element type STRING"):
        resolve_model(_model([helper.make_node("Identity", ["x"], ["y"])], inputs, [], 8))


def test_inputs_feeding_shapes_through_cast_unsqueeze_concat_are_named_data_shapes_not() -> None:
    tp = TensorProto
    nodes = [
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Cast", ["n1"], ["n64"], to=tp.INT64),
        helper.make_node("Shape", ["x"], ["xs"]),  # from the data tensor: not a shape input
        helper.make_node("Concat", ["xs", "n64"], ["shape"], axis=0),
        helper.make_node("Expand", ["x", "shape"], ["e"]),
        helper.make_node("Slice", ["e", "starts", "ends"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", tp.FLOAT, [1, 2]),
        helper.make_tensor_value_info("n", tp.INT32, []),
        helper.make_tensor_value_info("starts", tp.INT64, [1]),
    ]
    consts = [
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([2], np.int64), "ends"),  # a weight: a constant
    ]
    found = shape_tensor_inputs(_model(nodes, inputs, consts, 8))
    assert found == {"n": "Expand's input 1", "starts": "Slice's input 1"}


def test_importing_it_does_not_import_onnx_into_the_agent_daemon() -> None:
    code = "import sys, protocol.modelio; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
