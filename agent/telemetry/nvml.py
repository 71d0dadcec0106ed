"""Discrete NVIDIA GPUs through NVML (`pip install jetfleet[nvml]`, module `pynvml`).

Reading is split from converting: `NvmlReader.read_raw()` returns the plain NVML
figures (None where the GPU does not support a query), `to_gpu_stats()` turns them into
the telemetry's GpuStats, so a recorded raw sample can be replayed in tests.
Jetsons have no NVML; they use tegrastats or sysfs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from protocol.errors import CodedError
from protocol.telemetry import GpuStats

# Optional dependency (the `nvml` extra), imported on first use: a Jetson picks
# tegrastats/sysfs first and never needs it, and it costs the idle daemon ~1.3 MiB.
pynvml: Any = None
_import_failed = False

_init_lock = threading.Lock()
_init_count = 0


def _import_pynvml() -> None:
    global pynvml, _import_failed
    if pynvml is not None or _import_failed:
        return
    try:
        import pynvml as module
    except ImportError:  # pragma: no cover - depends on the install
        _import_failed = True
        return
    pynvml = module


class NvmlUnavailableError(CodedError, RuntimeError):
    """No pynvml module, no NVIDIA driver, or no GPU at that index."""

    code = "nvml_unavailable"


def _init() -> None:
    global _init_count
    _import_pynvml()
    if pynvml is None:
        raise NvmlUnavailableError("pynvml is not installed (pip install 'jetfleet[nvml]')")
    with _init_lock:
        if _init_count == 0:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as e:
                raise NvmlUnavailableError(f"NVML did not initialise: {e}") from e
        _init_count += 1


def _shutdown() -> None:
    global _init_count
    with _init_lock:
        if _init_count > 0:
            _init_count -= 1
            if _init_count == 0 and pynvml is not None:
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()


def nvml_available() -> bool:
    """True when NVML initialises and sees at least one GPU."""
    try:
        _init()
    except NvmlUnavailableError:
        return False
    try:
        assert pynvml is not None
        return int(pynvml.nvmlDeviceGetCount()) > 0
    except pynvml.NVMLError:
        return False
    finally:
        _shutdown()


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


class NvmlReader:
    """One GPU (by index) read through NVML; close() when done."""

    def __init__(self, index: int = 0) -> None:
        _init()
        assert pynvml is not None
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as e:
            _shutdown()
            raise NvmlUnavailableError(f"no NVIDIA GPU at index {index}: {e}") from e
        self.index = index
        self._closed = False

    def _q(self, fn: Callable[[], Any]) -> Any:
        """One query; None when this GPU or driver does not support it."""
        assert pynvml is not None
        try:
            return fn()
        except pynvml.NVMLError:
            return None

    def read_raw(self) -> dict[str, Any]:
        assert pynvml is not None
        nv, h = pynvml, self._handle
        util = self._q(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem = self._q(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        name = self._q(lambda: nv.nvmlDeviceGetName(h))
        driver = self._q(nv.nvmlSystemGetDriverVersion)
        return {
            "index": self.index,
            "name": _text(name) if name is not None else None,
            "driver_version": _text(driver) if driver is not None else None,
            "utilization_gpu_pct": util.gpu if util is not None else None,
            "utilization_memory_pct": util.memory if util is not None else None,
            "memory_used_bytes": int(mem.used) if mem is not None else None,
            "memory_total_bytes": int(mem.total) if mem is not None else None,
            "power_usage_mw": self._q(lambda: nv.nvmlDeviceGetPowerUsage(h)),
            "power_limit_mw": self._q(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h)),
            "temperature_c": self._q(
                lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
            ),
            "clock_graphics_mhz": self._q(
                lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_GRAPHICS)
            ),
            "clock_memory_mhz": self._q(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            "performance_state": self._q(lambda: nv.nvmlDeviceGetPerformanceState(h)),
        }

    def sample(self) -> GpuStats:
        return to_gpu_stats(self.read_raw())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _shutdown()


def to_gpu_stats(raw: dict[str, Any]) -> GpuStats:
    """NVML figures -> GpuStats: board power goes in as the `board` rail (mW)."""
    power = raw.get("power_usage_mw")
    temp = raw.get("temperature_c")
    return GpuStats(
        source="nvml",
        name=raw.get("name"),
        load_pct=raw.get("utilization_gpu_pct"),
        freq_mhz=raw.get("clock_graphics_mhz"),
        emc_pct=raw.get("utilization_memory_pct"),
        emc_freq_mhz=raw.get("clock_memory_mhz"),
        mem_used=raw.get("memory_used_bytes"),
        mem_total=raw.get("memory_total_bytes"),
        power_mw={"board": float(power)} if power is not None else {},
        temp_c=float(temp) if temp is not None else None,
    )
