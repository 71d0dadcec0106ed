"""Precision policy for TensorRT builds, kept free of TensorRT so it is testable anywhere.

Precision is decided when the bundle is built: `--precision fp16` puts fp16 weights in the
model (inputs/outputs stay fp32) and `--precision int8` quantizes it to explicit Q/DQ form.
The device then only has to honour what the model carries:

    TensorRT 10.x  weakly typed: fp16 -> BuilderFlag.FP16, int8 -> BuilderFlag.INT8 (the
                   Q/DQ nodes say where); int8 without Q/DQ would need on-device
                   calibration, which we do not do.
    TensorRT 11.x  strongly typed only: no precision flags exist; the model's own types rule,
                   so fp16 needs fp16 in the model and int8 needs Q/DQ.
"""

from __future__ import annotations

from pathlib import Path

from agent.engines.api import UnsupportedError
from protocol.manifest import BuildOptions


def requested(options: BuildOptions) -> str:
    return str(options.model_dump()["precision"])


def model_traits(model_path: Path) -> set[str]:
    """{"fp16", "qdq"}: the reduced precision the ONNX model itself carries."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    graph = m.graph
    traits: set[str] = set()
    fp16 = onnx.TensorProto.FLOAT16
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            traits.add("qdq")
        if node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute):
            traits.add("fp16")
    weights = list(getattr(graph, "initializer"))  # noqa: B009 (a protobuf field)
    if any(w.data_type == fp16 for w in weights):
        traits.add("fp16")
    return traits


def check_precision(precision: str, trt_version: str, traits: set[str]) -> None:
    """UnsupportedError with the fix when this TensorRT cannot build `precision` from a model
    with `traits`."""
    major = int(trt_version.split(".")[0])
    if precision == "int8" and "qdq" not in traits:
        raise UnsupportedError(
            f"the bundle asks for int8, but its model has no Q/DQ nodes and TensorRT "
            f"{trt_version} builds int8 only from explicitly quantized models (no calibration "
            "on the device): rebuild the bundle with `jetfleet bundle build --precision int8 "
            "--calibration FILE.npz`"
        )
    if precision == "fp16" and major >= 11 and "fp16" not in traits:
        raise UnsupportedError(
            f"the bundle asks for fp16, but TensorRT {trt_version} builds strongly typed "
            "networks only and this model is fp32 throughout: rebuild the bundle with "
            "`jetfleet bundle build --precision fp16` so that the fp16 weights come in the model"
        )


def builder_flags(precision: str, trt_major: int) -> list[str]:
    """The BuilderFlag names a weakly typed (10.x) build sets for `precision`; none on 11.x.

    int8 also allows fp16, as NVIDIA's int8 samples do: layers without Q/DQ nodes would
    otherwise run in fp32.
    """
    if trt_major >= 11:
        return []
    return {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}.get(precision, [])


def dla_core_to_use(dla_core: int | None, dla_cores: int, precision: str) -> tuple[int | None, str]:
    """(the DLA core to build for or None for the GPU, where the engine runs, in words).

    The bundle cannot know every robot's SoC (an Orin Nano has no DLA) and DLA runs fp16 and
    int8 only: both fall back to the GPU, said in the words rather than hidden.
    """
    if dla_core is None:
        return None, "gpu"
    if dla_core >= dla_cores:
        return None, f"gpu (DLA core {dla_core} asked, this device has {dla_cores} DLA cores)"
    if precision == "fp32":
        return None, f"gpu (DLA core {dla_core} asked, but DLA runs fp16/int8 only: bundle is fp32)"
    return dla_core, f"dla{dla_core}+gpu_fallback"
