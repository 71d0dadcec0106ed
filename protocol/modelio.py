"""What an ONNX model takes and gives: the one resolution `bundle build` and the device share.

    io = resolve_model_file(path)        # or resolve_model(model_proto)
    io.inputs      the inputs a caller must feed (TensorSpec), in graph order
    io.optional    inputs with a default (an initializer of that name): never fed
    io.outputs     the outputs (TensorSpec)
    io.data_files  external data files the weights live in, relative to the model

The rules are those of the ONNX IR, whatever exporter wrote the file:

- A graph input that has an initializer of the same name is a weight, never something
  the caller feeds. IR 3 exporters list every initializer as an input (they are constants
  there); from IR 4 on such an input is an overridable default. Both are `optional`.
- Nodes must use the standard ONNX operator set (domain "" or "ai.onnx"), or a function
  the model itself defines: a custom-domain op needs a plugin no jetfleet device has.
- External data locations are plain relative paths next to the model (no "..", not
  absolute): a model must not read a file outside its bundle.
- `shape_tensor_inputs` names inputs whose values feed a shape computation (Reshape's
  shape, Expand's shape, ...): TensorRT treats them as shape tensors, which a jetfleet
  build profile cannot express, so bundle build refuses them.

Works on a parsed `onnx.ModelProto` (attribute access only, so this module imports no
onnx: the agent daemon imports `protocol` and must stay free of it); `resolve_model_file`
imports onnx lazily, in the processes that build (bundle build, the engine child).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import ProtocolError
from protocol.manifest import DTYPES, TensorSpec

STANDARD_DOMAINS = ("", "ai.onnx")
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# TensorProto.DataType values of the dtypes a manifest can carry (protocol.manifest.DTYPES).
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
           9: "bool", 10: "float16", 11: "float64"}  # fmt: skip
_OTHER_TYPES = {4: "UINT16", 8: "STRING", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
                15: "COMPLEX128", 16: "BFLOAT16"}  # fmt: skip
_GRAPH_ATTR, _GRAPHS_ATTR = 5, 10  # AttributeProto.GRAPH, AttributeProto.GRAPHS


class ModelError(ProtocolError):
    """A model no jetfleet device can run as given (custom op, unsupported tensor type,
    unsafe data location); the reason names the op, tensor or file."""

    code = "unsupported"


@dataclass(frozen=True)
class ModelIO:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    optional: list[str]
    data_files: list[str]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


def resolve_model(model: Any) -> ModelIO:
    """Inputs, outputs, defaults and data files of a parsed ModelProto (ModelError if a
    device could not run it)."""
    graph = model.graph
    _check_ops(model)
    weights = {t.name for t in graph.initializer}
    inputs = [_spec(v, "input") for v in graph.input if v.name not in weights]
    optional = [v.name for v in graph.input if v.name in weights]
    outputs = [_spec(v, "output") for v in graph.output]
    if not inputs or not outputs:
        raise ModelError("the model has no inputs or no outputs (every input is a weight?)")
    return ModelIO(inputs, outputs, optional, _data_files(graph))


def resolve_model_file(path: Path) -> ModelIO:
    """resolve_model of an .onnx file, whose data files must sit beside it (not read)."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path.name} is not an ONNX model: {e}", code="build_failed") from e
    io = resolve_model(model)
    missing = [f for f in io.data_files if not (path.parent / f).is_file()]
    if missing:
        raise ModelError(
            f"{path.name} keeps weights in {', '.join(missing)}, which is not beside it"
        )
    return io


def _spec(value: Any, where: str) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        raise ModelError(f"model {where} {value.name!r} is not a tensor")
    ttype = value.type.tensor_type
    dtype = _DTYPES.get(ttype.elem_type)
    if dtype is None:
        name = _OTHER_TYPES.get(ttype.elem_type, f"type {ttype.elem_type}")
        raise ModelError(
            f"model {where} {value.name!r} has element type {name}; supported: {', '.join(DTYPES)}"
        )
    if not ttype.HasField("shape"):
        raise ModelError(f"model {where} {value.name!r} has no shape (rank unknown)")
    shape: list[int | str] = []
    for i, dim in enumerate(ttype.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            shape.append(dim.dim_param)
        else:  # an anonymous dynamic dim: give it a stable name
            shape.append(f"{value.name}_dim{i}")
    return TensorSpec(name=value.name, dtype=dtype, shape=shape)


def _nodes(graph: Any) -> Any:
    """Every node, subgraphs (If/Loop/Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == _GRAPH_ATTR:
                yield from _nodes(attr.g)
            elif attr.type == _GRAPHS_ATTR:
                for g in attr.graphs:
                    yield from _nodes(g)


# op type -> positions of its inputs that are shapes (or shape-like: sizes, counts, ranges).
_SHAPE_SLOTS = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,),
    "Slice": (1, 2, 3, 4), "Resize": (3,), "TopK": (1,), "Range": (0, 1, 2), "OneHot": (1,),
}  # fmt: skip
# Ops that pass values through unchanged (a shape built from an input by these is still it).
_PASS_THROUGH = {"Cast": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Identity": (0,), "Concat": None}


def shape_tensor_inputs(model: Any) -> dict[str, str]:
    """Caller-fed inputs whose values feed a shape computation, directly or through
    Cast/Concat/Unsqueeze/Squeeze/Identity: {input name: "Reshape's input 1", ...}."""
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    fed = {v.name for v in graph.input if v.name not in weights}
    producer = {out: node for node in _nodes(graph) for out in node.output}
    found: dict[str, str] = {}
    for node in _nodes(graph):
        for slot in _SHAPE_SLOTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot]:
                use = f"{node.op_type}'s input {slot}"
                for name in _sources(node.input[slot], producer):
                    if name in fed:
                        found.setdefault(name, use)
    return found


def _sources(name: str, producer: dict[str, Any]) -> set[str]:
    """The tensors a value comes from through pass-through ops (itself included)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        node = producer.get(current)
        if node is None or node.op_type not in _PASS_THROUGH:
            continue
        slots = _PASS_THROUGH[node.op_type] or range(len(node.input))
        todo += [node.input[i] for i in slots if i < len(node.input) and node.input[i]]
    return seen


def _check_ops(model: Any) -> None:
    local = {(f.domain, f.name) for f in getattr(model, "functions", ())}
    for node in _nodes(model.graph):
        if node.domain not in STANDARD_DOMAINS and (node.domain, node.op_type) not in local:
            where = f" (node {node.name!r})" if node.name else ""
            raise ModelError(
                f"op {node.op_type!r} of domain {node.domain!r}{where} is a custom op that "
                "neither TensorRT nor ONNX Runtime on a device implements: export the model "
                "with standard ONNX ops"
            )


def _data_files(graph: Any) -> list[str]:
    files: list[str] = []
    for t in graph.initializer:
        if t.data_location != _EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        check_data_location(location, t.name)
        if location not in files:
            files.append(location)
    return files


def check_data_location(location: str, tensor: str) -> None:
    """A data file must be a plain relative name beside the model, never outside it."""
    parts = location.replace("\\", "/").split("/")
    if not location or location.startswith("/") or "\\" in location or "\0" in location:
        raise ModelError(f"weight {tensor!r} names an unsafe data file {location!r}")
    if any(p in ("", ".", "..") for p in parts):
        raise ModelError(
            f"weight {tensor!r} names a data file {location!r} outside the model's directory"
        )
