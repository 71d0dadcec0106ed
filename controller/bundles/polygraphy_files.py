"""Golden data saved by NVIDIA Polygraphy: `polygraphy run model.onnx --onnxrt
--save-inputs inputs.json --save-outputs outputs.json`.

Read without Polygraphy itself (and never unpickled): both files are JSON whose arrays are
{"array": base64 of an .npy file, "polygraphy_class": "ndarray"}. The outputs file is a
RunResults: {"lst": [[runner_name, [IterationResult, ...]], ...]} with each iteration's
{"outputs": {name: LazyArray {"values": ndarray} | ndarray}}; the inputs file is a list of
feed dicts, one per iteration.

Only an ONNX Runtime run is accepted as golden outputs: golden outputs are the fp32
model's, and a TensorRT run may well have been fp16 or int8.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import CodedError

ORT_RUNNER_PREFIX = "onnxrt"


class PolygraphyFileError(CodedError):
    """A Polygraphy file that cannot serve as golden data; the message says why."""

    code = "polygraphy_file"


def is_polygraphy_json(path: Path) -> bool:
    return Path(path).suffix.lower() == ".json"


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise PolygraphyFileError(f"{what} {path} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PolygraphyFileError(f"{what} {path} is not a Polygraphy JSON file: {e}") from e


def _array(obj: Any, where: str) -> np.ndarray:
    if isinstance(obj, dict) and obj.get("polygraphy_class") in ("LazyArray", "LazyNumpyArray"):
        obj = obj.get("values")
    if not (isinstance(obj, dict) and obj.get("polygraphy_class") == "ndarray"):
        raise PolygraphyFileError(f"{where} is not a Polygraphy array")
    try:
        data = base64.b64decode(str(obj.get("array", "")).encode(), validate=True)
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (binascii.Error, ValueError, OSError, EOFError) as e:
        raise PolygraphyFileError(
            f"{where}: not a base64 .npy array (Polygraphy >= 0.30 writes those): {e}"
        ) from e
    if not isinstance(arr, np.ndarray):
        raise PolygraphyFileError(f"{where}: holds an archive, not one array")
    return arr


def _feed(obj: Any, where: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise PolygraphyFileError(f"{where} is not a map of tensor names to arrays")
    return {str(k): _array(v, f"{where} {k!r}") for k, v in obj.items()}


def load_outputs(path: Path) -> dict[str, np.ndarray]:
    """The outputs of the single iteration of the ONNX Runtime runner in a RunResults file."""
    doc = _read_json(path, "Polygraphy outputs file")
    if not (isinstance(doc, dict) and doc.get("polygraphy_class") == "RunResults"):
        raise PolygraphyFileError(
            f"{path} is not a Polygraphy RunResults file (polygraphy run --save-outputs)"
        )
    runs = [r for r in doc.get("lst", []) if isinstance(r, list) and len(r) == 2]
    names = [str(r[0]) for r in runs]
    ort = [r for r in runs if str(r[0]).startswith(ORT_RUNNER_PREFIX)]
    if len(ort) != 1:
        raise PolygraphyFileError(
            f"{path} must hold exactly one ONNX Runtime run (polygraphy run --onnxrt) to serve "
            f"as fp32 golden outputs; it holds {names or 'no runs'}"
        )
    iterations = ort[0][1]
    if not isinstance(iterations, list) or len(iterations) != 1:
        n = len(iterations) if isinstance(iterations, list) else 0
        raise PolygraphyFileError(
            f"{path}: the ONNX Runtime run has {n} iterations; golden data is one: rerun "
            "polygraphy with --iterations 1 (the default)"
        )
    result = iterations[0]
    if not isinstance(result, dict) or "outputs" not in result:
        raise PolygraphyFileError(f"{path}: the ONNX Runtime run holds no outputs")
    return _feed(result["outputs"], f"{path} output")


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    """The single feed of a `polygraphy run --save-inputs` file."""
    doc = _read_json(path, "Polygraphy inputs file")
    if not isinstance(doc, list) or len(doc) != 1:
        n = len(doc) if isinstance(doc, list) else 0
        raise PolygraphyFileError(
            f"{path} must be a `polygraphy run --save-inputs` file with one iteration; it holds {n}"
        )
    return _feed(doc[0], f"{path} input")


def load_golden_pair(outputs: Path, inputs: Path | None) -> dict[str, np.ndarray]:
    """As a golden npz would hold them: {"input.<name>": ..., "output.<name>": ...}."""
    if inputs is None:
        raise PolygraphyFileError(
            f"{outputs} holds Polygraphy outputs only: give the inputs they came from with "
            "--golden-inputs (polygraphy run --save-inputs FILE)"
        )
    arrays = {f"input.{k}": v for k, v in load_inputs(inputs).items()}
    arrays |= {f"output.{k}": v for k, v in load_outputs(outputs).items()}
    return arrays
