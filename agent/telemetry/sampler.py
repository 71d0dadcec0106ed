"""One TelemetrySample from the machine (psutil, sysfs, tegrastats or NVML) plus the
agent's own deployment view.

`deployment_view()` is the agent's callable; it returns a dict with these keys, all
optional except `device_id` when the sampler was not given one:

    {"device_id": "robot-0042",
     "uptime_s": 812.5,                    # else: seconds since the sampler was made
     "models": {"detector": {"version": "1.4.0", "p50_ms": 3.1, "p99_ms": 7.9, "count": 512,
                             "metrics": {"1.4.0": {"metrics": {"detections": {
                                 "kind": "counter", "n": 30, "sum": 87.0}},
                                 "errors": 0, "dropped": 0}}}},
     "jobs": {"done": 7, "failed": 1}}

GPU source, `gpu="auto"`: tegrastats when the binary exists (a Jetson), else Jetson sysfs
when the integrated GPU's load file exists, else NVML when it initialises, else none
(`gpu: null` in the sample). A failing source never fails the sample: the GPU part is
left null and the reason is logged once per distinct error.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import psutil
import structlog

from agent.telemetry.nvml import NvmlReader, NvmlUnavailableError, nvml_available
from agent.telemetry.sysfs import JetsonSysfs
from agent.telemetry.tegrastats import TegrastatsReader, TegrastatsReading, find_tegrastats
from protocol.errors import MessageError
from protocol.telemetry import CpuStats, GpuStats, MemStats, TelemetrySample

log = structlog.get_logger(__name__)

GpuChoice = Literal["auto", "tegrastats", "sysfs", "nvml", "none"]
MB = 1024 * 1024


def _free_bytes(path: Path) -> int | None:
    """Free space of the file system holding `path` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def _psutil_temps() -> dict[str, float]:
    out: dict[str, float] = {}
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return out
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return out
    for chip, entries in sensors.items():
        for i, e in enumerate(entries):
            key = f"{chip}/{e.label}" if e.label else (chip if i == 0 else f"{chip}/{i}")
            out[key] = float(e.current)
    return out


def gpu_from_tegrastats(
    r: TegrastatsReading, name: str | None = None, nvpmodel: str | None = None
) -> GpuStats:
    gpu_temp = next((v for k, v in r.temps_c.items() if k.lower() == "gpu"), None)
    return GpuStats(
        source="tegrastats",
        name=name,
        load_pct=r.gpu_load_pct,
        freq_mhz=r.gpu_freq_mhz,
        emc_pct=r.emc_pct,
        emc_freq_mhz=r.emc_freq_mhz,
        power_mw=dict(r.power_mw),
        nvpmodel=nvpmodel,
        temp_c=gpu_temp,
    )


class TelemetrySampler:
    """`sample()` returns a fresh TelemetrySample; call `close()` to stop helpers."""

    def __init__(
        self,
        data_dir: Path,
        deployment_view: Callable[[], dict[str, Any]],
        *,
        device_id: str | None = None,
        gpu: GpuChoice = "auto",
        sysfs_root: Path = Path("/"),
        tegrastats: TegrastatsReader | None = None,
        tegrastats_interval_s: float = 1.0,
        nvml_index: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.deployment_view = deployment_view
        self.device_id = device_id
        self.sysfs = JetsonSysfs(sysfs_root)
        self._started = time.monotonic()
        self._tegrastats: TegrastatsReader | None = None
        self._nvml: NvmlReader | None = None
        self._last_gpu_error: str | None = None
        self.source = self._choose(gpu, tegrastats, tegrastats_interval_s, nvml_index)
        # psutil's per-core percentages are relative to the previous call: prime it so the
        # first sample covers the time since construction instead of reading zeros.
        psutil.cpu_percent(percpu=True)
        log.info("telemetry_sampler_ready", gpu_source=self.source)

    def _choose(
        self,
        gpu: GpuChoice,
        reader: TegrastatsReader | None,
        interval_s: float,
        nvml_index: int,
    ) -> str:
        if gpu in ("auto", "tegrastats") and (reader is not None or find_tegrastats()):
            try:
                self._tegrastats = reader or TegrastatsReader(interval_s)
                self._tegrastats.start()
                return "tegrastats"
            except OSError as e:
                log.warning("tegrastats_unavailable", reason=str(e))
                self._tegrastats = None
        if gpu in ("auto", "sysfs", "tegrastats") and self.sysfs.available():
            return "sysfs"
        if gpu in ("auto", "nvml") and (gpu == "nvml" or nvml_available()):
            try:
                self._nvml = NvmlReader(nvml_index)
                return "nvml"
            except NvmlUnavailableError as e:
                log.warning("nvml_unavailable", reason=str(e))
        return "none"

    def _gpu(self) -> tuple[GpuStats | None, dict[str, float]]:
        """The GPU part and any extra temperatures its source reports."""
        try:
            if self._tegrastats is not None:
                r = self._tegrastats.latest(max_age_s=max(5.0, 3 * self._tegrastats.interval_s))
                if r is not None:
                    name, mode = self.sysfs.board_name(), self.sysfs.nvpmodel()
                    return gpu_from_tegrastats(r, name, mode), dict(r.temps_c)
                # No fresh line yet (just started, or tegrastats died): fall back.
                if self.sysfs.available():
                    return self.sysfs.gpu_stats(), {}
                return None, {}
            if self.source == "sysfs":
                return self.sysfs.gpu_stats(), {}
            if self._nvml is not None:
                return self._nvml.sample(), {}
        except Exception as e:  # a GPU source must never take the sample down
            reason = f"{type(e).__name__}: {e}"
            if reason != self._last_gpu_error:
                log.warning("telemetry_gpu_read_failed", source=self.source, reason=reason)
                self._last_gpu_error = reason
        return None, {}

    def sample(self) -> TelemetrySample:
        view = self.deployment_view() or {}
        device_id = self.device_id or view.get("device_id")
        if not device_id:
            raise MessageError(
                "telemetry: no device_id (pass TelemetrySampler(device_id=...) "
                "or return it from deployment_view())"
            )
        vm, sw = psutil.virtual_memory(), psutil.swap_memory()
        try:
            load1, load5, load15 = os.getloadavg()
        except OSError:
            load1 = load5 = load15 = 0.0
        temps = self.sysfs.temps_c() or _psutil_temps()
        gpu, gpu_temps = self._gpu()
        temps.update(gpu_temps)
        # decode() turns a bad deployment view into a MessageError naming the field.
        return TelemetrySample.decode(
            {
                "schema": TelemetrySample.schema_id(),
                "device_id": device_id,
                "at": datetime.now(timezone.utc),
                "uptime_s": float(view.get("uptime_s", time.monotonic() - self._started)),
                "cpu": CpuStats(
                    percent=[float(p) for p in psutil.cpu_percent(percpu=True)],
                    load1=load1,
                    load5=load5,
                    load15=load15,
                ),
                "mem": MemStats(
                    total=int(vm.total),
                    used=int(vm.total - vm.available),
                    available=int(vm.available),
                    swap_used=int(sw.used),
                ),
                "disk_free_bytes": _free_bytes(self.data_dir),
                "temps": temps,
                "gpu": gpu,
                "models": view.get("models") or {},
                "jobs": view.get("jobs") or {},
            }
        )

    def close(self) -> None:
        """Stop tegrastats and release NVML; idempotent."""
        if self._tegrastats is not None:
            self._tegrastats.stop()
        if self._nvml is not None:
            self._nvml.close()
