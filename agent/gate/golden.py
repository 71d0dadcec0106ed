"""Reading a bundle's golden.npz: arrays "input.<name>" and "output.<name>".

A few MB of deflated zeros decode to gigabytes, so `check_golden` reads only each
member's .npy header (the first bytes of the stream) and refuses, before any array is
read, a member the manifest does not name, a dtype or shape other than the manifest's,
or arrays that decode to more than the device allows.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from protocol.errors import BundleError
from protocol.manifest import TensorSpec

GOLDEN_INPUT_PREFIX = "input."
GOLDEN_OUTPUT_PREFIX = "output."


def check_golden(
    path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_bytes: int,
) -> None:
    """Raise BundleError unless the npz holds only the manifest's tensors, every input,
    at least one output, each with the manifest's dtype and shape, and at most
    `max_bytes` decoded in all. Reads the headers only."""
    name = Path(path).name
    specs = {GOLDEN_INPUT_PREFIX + t.name: t for t in inputs}
    specs.update({GOLDEN_OUTPUT_PREFIX + t.name: t for t in outputs})
    total = 0
    seen: set[str] = set()
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                spec = specs.get(key)
                if spec is None:
                    raise BundleError(
                        f"golden file {name} has array {key!r}, which the manifest does not name"
                    )
                with zf.open(info) as f:
                    shape, dtype = _header(f)
                total += _check_array(name, key, shape, dtype, spec)
                seen.add(key)
                if total > max_bytes:
                    raise BundleError(
                        f"golden file {name}: array {key!r} brings its arrays to "
                        f"{total // 2**20} MiB decoded, above this device's limit of "
                        f"{max_bytes // 2**20} MiB (limits.max_golden_mb)"
                    )
    # RuntimeError: an encrypted member; NotImplementedError: an unknown compression.
    except (
        OSError,
        ValueError,
        zipfile.BadZipFile,
        EOFError,
        RuntimeError,
        NotImplementedError,
    ) as e:
        raise BundleError(f"golden file {name} is unreadable: {e}") from e
    missing = [k for k in specs if k.startswith(GOLDEN_INPUT_PREFIX) and k not in seen]
    if missing or not any(k.startswith(GOLDEN_OUTPUT_PREFIX) for k in seen):
        raise BundleError(
            f"golden file {name} lacks {', '.join(repr(k) for k in missing) or 'any output'}"
        )


def _header(f: object) -> tuple[tuple[int, ...], np.dtype]:
    version = npy_format.read_magic(f)  # type: ignore[arg-type]
    if version == (1, 0):
        shape, _fortran, dtype = npy_format.read_array_header_1_0(f)  # type: ignore[arg-type]
    elif version == (2, 0):
        shape, _fortran, dtype = npy_format.read_array_header_2_0(f)  # type: ignore[arg-type]
    else:
        raise ValueError(f"npy format version {version} is not supported")
    return tuple(shape), dtype


def _check_array(
    name: str, key: str, shape: tuple[int, ...], dtype: np.dtype, spec: TensorSpec
) -> int:
    """The array's decoded size in bytes, once its dtype and shape fit the manifest."""
    if dtype != np.dtype(spec.dtype):
        raise BundleError(
            f"golden file {name}: array {key!r} is {dtype}, the manifest says {spec.dtype}"
        )
    fits = len(shape) == len(spec.shape) and all(
        isinstance(want, str) or got == want for got, want in zip(shape, spec.shape, strict=True)
    )
    if not fits:
        raise BundleError(
            f"golden file {name}: array {key!r} has shape {list(shape)}, "
            f"the manifest says {spec.shape}"
        )
    return math.prod(shape) * dtype.itemsize


def load_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, outputs) by tensor name; never unpickles (allow_pickle=False)."""
    inputs: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                if key.startswith(GOLDEN_INPUT_PREFIX):
                    inputs[key[len(GOLDEN_INPUT_PREFIX) :]] = data[key]
                elif key.startswith(GOLDEN_OUTPUT_PREFIX):
                    outputs[key[len(GOLDEN_OUTPUT_PREFIX) :]] = data[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BundleError(f"golden file {Path(path).name} is unreadable: {e}") from e
    if not inputs or not outputs:
        raise BundleError(
            f"golden file {Path(path).name} needs 'input.<name>' and 'output.<name>' arrays; "
            f"it has {len(inputs)} input(s) and {len(outputs)} output(s)"
        )
    return inputs, outputs
