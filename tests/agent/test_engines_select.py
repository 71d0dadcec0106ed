"""Backend choice on a device whose TensorRT is too old (JetPack 6.0 ships TensorRT 8.6).

TensorRT cannot be installed here, so the module is faked at the one point that matters:
its version string, as JetPack 6.0's python3-libnvinfer reports it.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
import structlog.testing

from agent.engines import (
    UnsupportedError,
    choose_backend,
    cuda_buffers,
    select_backend,
    tensorrt_available,
)


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


@pytest.fixture
def tensorrt_without_pycuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """JetPack 6's python3-libnvinfer is there; pycuda (built from source, needs nvcc) is not."""
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "10.3.0"  # type: ignore[attr-defined]
    mod.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    monkeypatch.setitem(sys.modules, "pycuda", None)  # what `import pycuda` cannot find


@pytest.mark.usefixtures("tensorrt_without_pycuda")
def test_auto_without_pycuda_falls_back_to_the_cpu_loudly_and_says_why() -> None:
    with structlog.testing.capture_logs() as logs:
        choice = choose_backend("auto")
    assert choice.backend.name == "onnxruntime"
    assert choice.fallback is not None and "pycuda is not installed" in choice.fallback
    assert "nvcc" in choice.fallback
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["tensorrt_unusable_falling_back_to_cpu"]
    assert "pycuda" in warnings[0]["reason"]


@pytest.mark.usefixtures("tensorrt_without_pycuda")
def test_a_config_that_refuses_the_cpu_fallback_gets_an_unsupported_error() -> None:
    with pytest.raises(UnsupportedError, match=r"refuses a CPU fallback.*pycuda is not installed"):
        choose_backend("auto", allow_cpu_fallback=False)


@pytest.mark.usefixtures("jetpack60_tensorrt")
def test_a_too_old_tensorrt_is_reported_as_the_fallback_reason() -> None:
    choice = choose_backend("auto")
    assert choice.fallback is not None and "8.6.2" in choice.fallback


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="this machine is a Jetson")
def test_a_pc_without_tensorrt_uses_onnxruntime_without_calling_it_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what `import tensorrt` cannot find
    assert not tensorrt_available()
    choice = choose_backend("auto", allow_cpu_fallback=False)
    assert choice.backend.name == "onnxruntime" and choice.fallback is None
