"""Real ONNX models built with onnx.helper, shared by the tests of every package.

make_mlp(path, ...)       an MLP "x" [batch, in] -> "y" [batch, out]; `extra_work` adds
                          genuine compute (a side branch that ORT cannot fold away)
                          while the outputs stay bit-identical
make_convnet(path, ...)   a small conv net "image" [batch, 3, H, W] -> "logits" [batch, 10]
make_golden(model, inputs) -> {"input.<name>": ..., "output.<name>": ...}  (ORT fp32)
write_golden(path, golden) -> path   (np.savez, loadable with allow_pickle=False)
mlp_inputs / convnet_inputs(batch, seed) -> feeds
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _round_weights(arr: np.ndarray, weight_precision: str) -> np.ndarray:
    # "fp16" stores weights rounded through float16: the precision loss of an fp16
    # conversion, kept in an fp32 graph so every backend runs it unchanged.
    if weight_precision == "fp16":
        return arr.astype(np.float16).astype(np.float32)
    if weight_precision != "fp32":
        raise ValueError(f"weight_precision must be fp32 or fp16, not {weight_precision!r}")
    return arr


def make_mlp(
    path: Path,
    *,
    in_dim: int = 64,
    hidden: int = 128,
    out_dim: int = 16,
    layers: int = 2,
    extra_work: float = 0.0,
    seed: int = 0,
    weight_precision: str = "fp32",
    batch: int | str = "batch",
) -> Path:
    """An MLP whose weights depend only on (dims, layers, seed): same seed, same outputs.

    extra_work = 0.15 adds a side branch of about 15% of the MLP's multiply-adds. Its
    result is a tanh (finite), subtracted from itself and added to the output: exactly
    zero, but ORT has no rewrite for Sub(t, t), so the matmuls really run every time.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    cur = "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = _round_weights((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
                           weight_precision)  # fmt: skip
        bias = _round_weights((rng.standard_normal(b) * 0.1).astype(np.float32), weight_precision)
        inits += [_init(f"w{i}", w), _init(f"b{i}", bias)]
        nodes += [
            helper.make_node("MatMul", [cur, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"]),
        ]
        cur = f"h{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    if extra_work > 0:
        main_macs = sum(a * b for a, b in itertools.pairwise(dims))
        width = max(1, round(extra_work * main_macs / (in_dim + out_dim)))
        xrng = np.random.default_rng(seed + 10_000)
        e1 = (xrng.standard_normal((in_dim, width)) / np.sqrt(in_dim)).astype(np.float32)
        e2 = (xrng.standard_normal((width, out_dim)) / np.sqrt(width)).astype(np.float32)
        inits += [_init("extra_w1", e1), _init("extra_w2", e2)]
        nodes += [
            helper.make_node("MatMul", ["x", "extra_w1"], ["extra_mm1"]),
            helper.make_node("Relu", ["extra_mm1"], ["extra_r"]),
            helper.make_node("MatMul", ["extra_r", "extra_w2"], ["extra_mm2"]),
            helper.make_node("Tanh", ["extra_mm2"], ["extra_t"]),
            helper.make_node("Sub", ["extra_t", "extra_t"], ["extra_zero"]),
            helper.make_node("Add", [cur, "extra_zero"], ["y_sum"]),
        ]
        cur = "y_sum"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out_dim])],
        inits,
    )
    return _save(graph, path)


def make_convnet(
    path: Path, *, size: int = 32, channels: int = 8, classes: int = 10, seed: int = 0
) -> Path:
    """Conv-ReLU-Conv-ReLU-GlobalAvgPool-Gemm: "image" [batch, 3, size, size] -> "logits"."""
    rng = np.random.default_rng(seed)
    c1, c2 = channels, channels * 2
    w1 = (rng.standard_normal((c1, 3, 3, 3)) / np.sqrt(27)).astype(np.float32)
    w2 = (rng.standard_normal((c2, c1, 3, 3)) / np.sqrt(9 * c1)).astype(np.float32)
    fc = (rng.standard_normal((classes, c2)) / np.sqrt(c2)).astype(np.float32)
    inits = [
        _init("conv1_w", w1),
        _init("conv1_b", (rng.standard_normal(c1) * 0.1).astype(np.float32)),
        _init("conv2_w", w2),
        _init("conv2_b", (rng.standard_normal(c2) * 0.1).astype(np.float32)),
        _init("fc_w", fc),
        _init("fc_b", (rng.standard_normal(classes) * 0.1).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv1_w", "conv1_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "Conv", ["r1", "conv2_w", "conv2_b"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime we support (>= 1.17)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_inputs(batch: int = 8, in_dim: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, in_dim)).astype(np.float32)}


def convnet_inputs(batch: int = 2, size: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def make_golden(model_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference outputs by ONNX Runtime on CPU in fp32, all optimizations off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, inputs)
    golden = {f"input.{k}": v for k, v in inputs.items()}
    golden.update({f"output.{n}": v for n, v in zip(names, outs, strict=True)})
    return golden


def write_golden(
    path: Path,
    golden: dict[str, np.ndarray],
    zeros: dict[str, tuple[tuple[int, ...], str]] | None = None,
) -> Path:
    """`zeros` adds arrays of zeros by name: (shape, dtype), streamed deflated into the
    npz without ever existing in memory (a golden file that inflates to gigabytes)."""
    import zipfile

    path = Path(path)
    if not zeros:
        with open(path, "wb") as f:
            np.savez(f, **golden)
        return path
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in golden.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
        for name, (shape, dtype) in zeros.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(f, header)
                left = int(np.prod(shape)) * np.dtype(dtype).itemsize
                block = bytes(1 << 22)
                while left > 0:
                    f.write(block[: min(left, len(block))])
                    left -= len(block)
    return path
