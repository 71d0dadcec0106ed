"""Backend choice on a device whose TensorRT is too old (JetPack 6.0 ships TensorRT 8.6).

TensorRT cannot be installed here, so the module is faked at the one point that matters:
its version string, as JetPack 6.0's python3-libnvinfer reports it.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from agent.engines import UnsupportedError, cuda_buffers, select_backend


@pytest.fixture
def jetpack60_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, version in (("tensorrt", "8.6.2"), ("pycuda", "2024.1")):
        mod = types.ModuleType(name)
        mod.__version__ = version  # type: ignore[attr-defined]
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cuda_buffers, "cuda_available", lambda: True)


@pytest.mark.usefixtures("jetpack60_tensorrt")
def test_auto_falls_back_to_onnxruntime_when_tensorrt_is_too_old() -> None:
    assert select_backend("auto").name == "onnxruntime"


@pytest.mark.usefixtures("jetpack60_tensorrt")
def test_explicit_tensorrt_that_is_too_old_says_which_version_it_found() -> None:
    with pytest.raises(UnsupportedError, match=r"TensorRT 8\.6\.2 is older than 10\.0"):
        select_backend("tensorrt")
