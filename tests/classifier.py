"""A small real classifier (ResNet-style) for the reduced-precision accuracy tests.

make_resnet(path)   "image" [batch, 3, 32, 32] -> "logits" [batch, 10]: a stem conv, three
                    residual stages (two 3x3 convs + skip, the last two downsampling with a
                    1x1 projection), global average pooling and a fully connected head; the
                    BatchNorms are folded into the convs, as in an exported model
images(n, seed)     inputs that look like normalised photos: smooth, spatially correlated
                    colour fields, not white noise (quantization ranges depend on this)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = 10
SIZE = 32


class _Net:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        self.n += 1
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        b = self.rng.standard_normal(cout) * 0.05
        self.inits += [
            numpy_helper.from_array(w.astype(np.float32), f"conv{self.n}_w"),
            numpy_helper.from_array(b.astype(np.float32), f"conv{self.n}_b"),
        ]
        out = f"conv{self.n}"
        pad = k // 2
        inputs = [x, f"conv{self.n}_w", f"conv{self.n}_b"]
        self.nodes.append(
            helper.make_node("Conv", inputs, [out], pads=[pad] * 4, strides=[stride, stride])
        )
        return self.relu(out) if relu else out

    def relu(self, x: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [f"{x}_relu"]))
        return f"{x}_relu"

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        h = self.conv(x, cin, cout, 3, stride)
        h = self.conv(h, cout, cout, 3, relu=False)
        skip = x if stride == 1 and cin == cout else self.conv(x, cin, cout, 1, stride, False)
        self.nodes.append(helper.make_node("Add", [h, skip], [f"{h}_add"]))
        return self.relu(f"{h}_add")


def make_resnet(path: Path, *, width: int = 16, seed: int = 0) -> Path:
    net = _Net(seed)
    h = net.conv("image", 3, width, 3)
    h = net.block(h, width, width, 1)
    h = net.block(h, width, width * 2, 2)
    h = net.block(h, width * 2, width * 4, 2)
    fc = net.rng.standard_normal((CLASSES, width * 4)) * np.sqrt(1.0 / (width * 4)) * 4
    net.inits += [
        numpy_helper.from_array(fc.astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fc_b"),
    ]
    net.nodes += [
        helper.make_node("GlobalAveragePool", [h], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        net.nodes,
        "resnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        net.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def images(n: int, seed: int = 1) -> np.ndarray:
    """[n, 3, 32, 32] float32: low-frequency colour fields plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((n, 3, 4, 4))
    smooth = coarse.repeat(SIZE // 4, axis=2).repeat(SIZE // 4, axis=3)
    kernel = np.ones(5) / 5
    for axis in (2, 3):
        smooth = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, smooth)
    return (smooth + 0.1 * rng.standard_normal(smooth.shape)).astype(np.float32)
