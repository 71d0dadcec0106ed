"""Reading a bundle's golden.npz: arrays "input.<name>" and "output.<name>"."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from protocol.errors import BundleError

GOLDEN_INPUT_PREFIX = "input."
GOLDEN_OUTPUT_PREFIX = "output."


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
