"""A corpus of real-world ONNX model shapes, generated with onnx.helper (no downloads).

Each entry is a small but genuine architecture in the form a real exporter leaves it:

    resnet_ir3        ResNet-style CNN (Conv-BN-Relu, residual Add, MaxPool, GAP, Gemm),
                      IR 3 / opset 8 with every initializer also a graph input and
                      Caffe2-era tensor names ("gpu_0/data_0"), as the old model zoo has
    squeezenet_ir3    SqueezeNet-style fire modules (1x1 squeeze, 1x1 + 3x3 expand, Concat),
                      Dropout, AveragePool, Softmax; IR 3 / opset 7, initializers as inputs
    mobilenet         MobileNet-style depthwise/pointwise convs, Clip(0, 6), HardSwish,
                      dynamic batch with a profile; opset 14
    gru_seq           GRU over a dynamic (sequence, batch) axis pair with profiles; two
                      outputs (all states and the last state); opset 11
    encoder           transformer-encoder-style: int64 token ids and a bool padding mask,
                      embedding Gather, LayerNormalization, self-attention, dynamic batch
                      and sequence with profiles, two outputs; opset 21
    fp16_mlp          fp16 throughout (inputs, weights, outputs); opset 13
    optional_input    an overridable initializer listed as an input (a default the
                      caller may replace): IR 8 / opset 17, never fed by the golden file
    external_data     a CNN whose weights sit in files next to the .onnx (as every
                      model over 2 GB has), in two files
    custom_op         a node of a custom domain: must be refused at `bundle build`

`CORPUS[name].build(dir)` writes the model (and its data files) into `dir` and returns
the .onnx path; `.profiles` are `--profile` arguments; `.refusal` is the text the
refusal must contain (None: the model must deploy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, F16, I64, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL


class _Weights:
    """Deterministic initializers, He-scaled so activations stay O(1) through the net."""

    def __init__(self, seed: int, dtype: type = np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.inits: list[onnx.TensorProto] = []

    def add(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def normal(self, name: str, shape: tuple[int, ...], fan_in: int | None = None) -> str:
        scale = 1.0 / np.sqrt(fan_in) if fan_in else 0.1
        return self.add(name, (self.rng.standard_normal(shape) * scale).astype(self.dtype))

    def positive(self, name: str, shape: tuple[int, ...]) -> str:
        return self.add(name, (0.5 + self.rng.random(shape)).astype(self.dtype))


def _model(
    graph: onnx.GraphProto, opset: int, ir: int, extra_opsets: dict[str, int] | None = None
) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="jetfleet-modelzoo")
    model.ir_version = ir
    return model


def _initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """What IR 3 exporters wrote: every initializer is also declared a graph input."""
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return model


def _save(model: onnx.ModelProto, path: Path, *, check: bool = True) -> Path:
    if check:
        onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# -- architectures -----------------------------------------------------------------------


def _conv_bn_relu(
    w: _Weights, nodes: list[onnx.NodeProto], x: str, name: str, cin: int, cout: int, **attrs: int
) -> str:
    k = 3 if attrs.pop("k", 3) == 3 else 1
    pad = k // 2
    nodes.append(
        helper.make_node(
            "Conv",
            [x, w.normal(f"{name}_w_0", (cout, cin, k, k), cin * k * k)],
            [f"{name}_conv"],
            kernel_shape=[k, k],
            pads=[pad] * 4,
            **attrs,
        )
    )
    bn = [w.positive(f"{name}_s_0", (cout,)), w.normal(f"{name}_b_0", (cout,))]
    bn += [w.normal(f"{name}_rm_0", (cout,)), w.positive(f"{name}_riv_0", (cout,))]
    nodes.append(helper.make_node("BatchNormalization", [f"{name}_conv", *bn], [f"{name}_bn"]))
    nodes.append(helper.make_node("Relu", [f"{name}_bn"], [f"{name}_relu"]))
    return f"{name}_relu"


def resnet_ir3(out: Path) -> Path:
    w, nodes = _Weights(1), []
    x = _conv_bn_relu(w, nodes, "gpu_0/data_0", "gpu_0/conv1", 3, 8)
    nodes.append(helper.make_node("MaxPool", [x], ["pool1"], kernel_shape=[2, 2], strides=[2, 2]))
    a = _conv_bn_relu(w, nodes, "pool1", "gpu_0/res2a", 8, 8)
    b = _conv_bn_relu(w, nodes, a, "gpu_0/res2b", 8, 8)
    nodes.append(helper.make_node("Add", ["pool1", b], ["res2_sum"]))
    nodes.append(helper.make_node("Relu", ["res2_sum"], ["res2"]))
    c = _conv_bn_relu(w, nodes, "res2", "gpu_0/res3", 8, 16, strides=[2, 2])
    nodes.append(helper.make_node("GlobalAveragePool", [c], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    fc = [w.normal("gpu_0/pred_w_0", (10, 16), 16), w.normal("gpu_0/pred_b_0", (10,))]
    nodes.append(helper.make_node("Gemm", ["flat", *fc], ["gpu_0/pred_1"], transB=1))
    nodes.append(helper.make_node("Softmax", ["gpu_0/pred_1"], ["gpu_0/softmax_1"]))
    graph = helper.make_graph(
        nodes,
        "resnet_ir3",
        [helper.make_tensor_value_info("gpu_0/data_0", FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("gpu_0/softmax_1", FLOAT, [1, 10])],
        w.inits,
    )
    return _save(_initializers_as_inputs(_model(graph, 8, 3)), out / "resnet_ir3.onnx")


def _fire(w: _Weights, nodes: list[onnx.NodeProto], x: str, name: str, cin: int, s: int) -> str:
    def conv(inp: str, tag: str, cin_: int, cout: int, k: int) -> str:
        wn = w.normal(f"{name}/{tag}_w_0", (cout, cin_, k, k), cin_ * k * k)
        bn = w.normal(f"{name}/{tag}_b_0", (cout,))
        nodes.append(helper.make_node("Conv", [inp, wn, bn], [f"{name}/{tag}"], pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [f"{name}/{tag}"], [f"{name}/{tag}_relu"]))
        return f"{name}/{tag}_relu"

    sq = conv(x, "squeeze1x1", cin, s, 1)
    e1, e3 = conv(sq, "expand1x1", s, 2 * s, 1), conv(sq, "expand3x3", s, 2 * s, 3)
    nodes.append(helper.make_node("Concat", [e1, e3], [f"{name}/concat"], axis=1))
    return f"{name}/concat"


def squeezenet_ir3(out: Path) -> Path:
    w, nodes = _Weights(2), []
    stem = [w.normal("conv1_w_0", (16, 3, 3, 3), 27), w.normal("conv1_b_0", (16,))]
    nodes.append(helper.make_node("Conv", ["data_0", *stem], ["conv1"], strides=[2, 2]))
    nodes.append(helper.make_node("Relu", ["conv1"], ["conv1_relu"]))
    nodes.append(
        helper.make_node("MaxPool", ["conv1_relu"], ["pool1"], kernel_shape=[3, 3], strides=[2, 2])
    )
    f2 = _fire(w, nodes, "pool1", "fire2", 16, 4)
    f3 = _fire(w, nodes, f2, "fire3", 16, 4)
    nodes.append(helper.make_node("Dropout", [f3], ["drop9"], ratio=0.5))
    cls = [w.normal("conv10_w_0", (10, 16, 1, 1), 16), w.normal("conv10_b_0", (10,))]
    nodes.append(helper.make_node("Conv", ["drop9", *cls], ["conv10"]))
    nodes.append(helper.make_node("Relu", ["conv10"], ["conv10_relu"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["conv10_relu"], ["pool10"]))
    nodes.append(helper.make_node("Reshape", ["pool10", "reshape_shape"], ["flat"]))
    w.add("reshape_shape", np.array([1, 10], dtype=np.int64))
    nodes.append(helper.make_node("Softmax", ["flat"], ["softmaxout_1"]))
    graph = helper.make_graph(
        nodes,
        "squeezenet_ir3",
        [helper.make_tensor_value_info("data_0", FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("softmaxout_1", FLOAT, [1, 10])],
        w.inits,
    )
    return _save(_initializers_as_inputs(_model(graph, 7, 3)), out / "squeezenet_ir3.onnx")


def mobilenet(out: Path) -> Path:
    w, nodes = _Weights(3), []
    w.add("relu6_min", np.array(0.0, dtype=np.float32))
    w.add("relu6_max", np.array(6.0, dtype=np.float32))

    def block(x: str, name: str, cin: int, cout: int, stride: int) -> str:
        dw = [w.normal(f"{name}.dw.weight", (cin, 1, 3, 3), 9), w.normal(f"{name}.dw.bias", (cin,))]
        nodes.append(
            helper.make_node(
                "Conv", [x, *dw], [f"{name}.dw"], group=cin, pads=[1] * 4, strides=[stride] * 2
            )
        )
        nodes.append(
            helper.make_node("Clip", [f"{name}.dw", "relu6_min", "relu6_max"], [f"{name}.r6"])
        )
        pw = [w.normal(f"{name}.pw.weight", (cout, cin, 1, 1), cin)]
        nodes.append(helper.make_node("Conv", [f"{name}.r6", *pw], [f"{name}.pw"]))
        nodes.append(helper.make_node("HardSwish", [f"{name}.pw"], [f"{name}.out"]))
        return f"{name}.out"

    stem = [w.normal("stem.weight", (8, 3, 3, 3), 27)]
    nodes.append(helper.make_node("Conv", ["input", *stem], ["stem"], pads=[1] * 4, strides=[2, 2]))
    nodes.append(helper.make_node("Clip", ["stem", "relu6_min", "relu6_max"], ["stem.r6"]))
    x = block("stem.r6", "features.1", 8, 16, 1)
    x = block(x, "features.2", 16, 24, 2)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    fc = [w.normal("classifier.weight", (24, 10), 24), w.normal("classifier.bias", (10,))]
    nodes.append(helper.make_node("MatMul", ["flat", fc[0]], ["mm"]))
    nodes.append(helper.make_node("Add", ["mm", fc[1]], ["output"]))
    graph = helper.make_graph(
        nodes,
        "mobilenet",
        [helper.make_tensor_value_info("input", FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("output", FLOAT, ["batch", 10])],
        w.inits,
    )
    return _save(_model(graph, 14, 7), out / "mobilenet.onnx")


def gru_seq(out: Path) -> Path:
    w, hidden, feat = _Weights(4), 16, 8
    gru = [
        "features",
        w.normal("gru.W", (1, 3 * hidden, feat), feat),
        w.normal("gru.R", (1, 3 * hidden, hidden), hidden),
        w.normal("gru.B", (1, 6 * hidden)),
    ]
    nodes = [
        helper.make_node("GRU", gru, ["all_states", "last_state"], hidden_size=hidden),
        helper.make_node("Squeeze", ["all_states", "one"], ["states"]),
    ]
    w.add("one", np.array([1], dtype=np.int64))
    graph = helper.make_graph(
        nodes,
        "gru_seq",
        [helper.make_tensor_value_info("features", FLOAT, ["seq", "batch", feat])],
        [
            helper.make_tensor_value_info("states", FLOAT, ["seq", "batch", hidden]),
            helper.make_tensor_value_info("last_state", FLOAT, [1, "batch", hidden]),
        ],
        w.inits,
    )
    return _save(_model(graph, 13, 7), out / "gru_seq.onnx")


def encoder(out: Path) -> Path:
    w, vocab, d = _Weights(5), 32, 16
    w.add("emb", (w.rng.standard_normal((vocab, d))).astype(np.float32))
    ln = [w.positive("ln.gamma", (d,)), w.normal("ln.beta", (d,))]
    for p in ("q", "k", "v", "o"):
        w.normal(f"attn.{p}", (d, d), d)
    w.add("scale", np.array(1.0 / np.sqrt(d), dtype=np.float32))
    w.add("neg_inf", np.array(-1e4, dtype=np.float32))
    w.add("mask_axes", np.array([1], dtype=np.int64))
    w.add("pool_axes", np.array([1], dtype=np.int64))
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "input_ids"], ["x"]),
        n("LayerNormalization", ["x", *ln], ["h"], axis=-1),
        n("MatMul", ["h", "attn.q"], ["q"]),
        n("MatMul", ["h", "attn.k"], ["k"]),
        n("MatMul", ["h", "attn.v"], ["v"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["scores_raw"]),
        n("Mul", ["scores_raw", "scale"], ["scores"]),
        n("Unsqueeze", ["attention_mask", "mask_axes"], ["mask3"]),  # [b, 1, s]
        n("Where", ["mask3", "scores", "neg_inf"], ["masked"]),
        n("Softmax", ["masked"], ["attn"], axis=-1),
        n("MatMul", ["attn", "v"], ["ctx"]),
        n("MatMul", ["ctx", "attn.o"], ["proj"]),
        n("Add", ["x", "proj"], ["last_hidden_state"]),
        n("ReduceMean", ["last_hidden_state", "pool_axes"], ["pooler_output"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", I64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", BOOL, ["batch", "sequence"]),
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", FLOAT, ["batch", "sequence", d]),
            helper.make_tensor_value_info("pooler_output", FLOAT, ["batch", d]),
        ],
        w.inits,
    )
    return _save(_model(graph, 21, 10), out / "encoder.onnx")


def fp16_mlp(out: Path) -> Path:
    w = _Weights(6, np.float16)
    nodes = [
        helper.make_node("MatMul", ["x", w.normal("w0", (32, 64), 32)], ["m0"]),
        helper.make_node("Add", ["m0", w.normal("b0", (64,))], ["a0"]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("MatMul", ["r0", w.normal("w1", (64, 8), 64)], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16_mlp",
        [helper.make_tensor_value_info("x", F16, [2, 32])],
        [helper.make_tensor_value_info("y", F16, [2, 8])],
        w.inits,
    )
    return _save(_model(graph, 13, 7), out / "fp16_mlp.onnx")


def optional_input(out: Path) -> Path:
    w = _Weights(7)
    w.add("temperature", np.array([2.0], dtype=np.float32))  # a default the caller may override
    nodes = [
        helper.make_node("MatMul", ["features", w.normal("proj", (12, 5), 12)], ["logits"]),
        helper.make_node("Div", ["logits", "temperature"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "optional_input",
        [
            helper.make_tensor_value_info("features", FLOAT, [4, 12]),
            helper.make_tensor_value_info("temperature", FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("probs", FLOAT, [4, 5])],
        w.inits,
    )
    return _save(_model(graph, 17, 8), out / "optional_input.onnx")


def external_data(out: Path) -> Path:
    """Weights in two files beside the model: conv weights in one, the classifier in another."""
    w, nodes = _Weights(8), []
    x = _conv_bn_relu(w, nodes, "pixel_values", "backbone.conv", 3, 16)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    fc = [w.normal("head.weight", (20, 16), 16), w.normal("head.bias", (20,))]
    nodes.append(helper.make_node("Gemm", ["flat", *fc], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "external_data",
        [helper.make_tensor_value_info("pixel_values", FLOAT, [1, 3, 24, 24])],
        [helper.make_tensor_value_info("logits", FLOAT, [1, 20])],
        w.inits,
    )
    model = _model(graph, 17, 8)
    for t in model.graph.initializer:
        location = "head.bin" if t.name.startswith("head.") else "backbone.bin"
        onnx.external_data_helper.set_external_data(t, location)
    path = out / "external_data.onnx"
    out.mkdir(parents=True, exist_ok=True)
    for location in ("head.bin", "backbone.bin"):
        (out / location).unlink(missing_ok=True)
    # write_external_data_tensors moves each raw_data into its file (appending, aligned).
    onnx.external_data_helper.write_external_data_tensors(model, str(out))
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # by path: the checker reads the data files
    return path


def custom_op(out: Path) -> Path:
    w = _Weights(9)
    nodes = [
        helper.make_node("MatMul", ["x", w.normal("w", (8, 8), 8)], ["h"]),
        helper.make_node("FancyNorm", ["h"], ["y"], domain="com.example.vision"),
    ]
    graph = helper.make_graph(
        nodes,
        "custom_op",
        [helper.make_tensor_value_info("x", FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 8])],
        w.inits,
    )
    model = _model(graph, 17, 8, {"com.example.vision": 1})
    return _save(model, out / "custom_op.onnx")


# -- the corpus --------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[Path], Path]
    profiles: tuple[str, ...] = ()  # `--profile` arguments
    refusal: str | None = None  # text the `bundle build` refusal must contain

    def __str__(self) -> str:
        return self.name


CORPUS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("resnet_ir3", resnet_ir3),
        ZooModel("squeezenet_ir3", squeezenet_ir3),
        ZooModel("mobilenet", mobilenet, ("input:1x3x32x32/2x3x32x32/4x3x32x32",)),
        ZooModel("gru_seq", gru_seq, ("features:1x1x8/6x2x8/12x4x8",)),
        ZooModel(
            "encoder",
            encoder,
            ("input_ids:1x1/2x7/4x16", "attention_mask:1x1/2x7/4x16"),
        ),
        ZooModel("fp16_mlp", fp16_mlp),
        ZooModel("optional_input", optional_input),
        ZooModel("external_data", external_data),
        ZooModel(
            "custom_op",
            custom_op,
            refusal="op 'FancyNorm' of domain 'com.example.vision'",
        ),
    )
}
DEPLOYABLE = [m for m in CORPUS.values() if m.refusal is None]
REFUSED = [m for m in CORPUS.values() if m.refusal is not None]
