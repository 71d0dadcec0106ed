"""Jetson vital signs straight from sysfs, for when `tegrastats` is missing or not allowed.

Every path is read under `root` (default `/`), so tests feed a recorded tree. What we read:

- GPU load: `sys/devices/gpu.0/load` (JetPack 4) or `sys/devices/platform/gpu.0/load`
  (JetPack 5/6), in per mille; GPU frequency from the GPU's devfreq node
  (`sys/class/devfreq/57000000.gpu` on Nano, `17000000.gv11b` on Xavier,
  `17000000.ga10b` / `17000000.gpu` on Orin, `gpu-gpc-0` on Thor with JetPack 7) in Hz,
  with the governor's `min_freq` / `max_freq` limits next to `cur_freq` (kernel ABI
  `sysfs-class-devfreq`): `jetson_clocks` pins a clock by raising its minimum to its maximum.
- CPU clocks per cpufreq policy (`sys/devices/system/cpu/cpufreq/policy*/scaling_*_freq`,
  kHz; kernel ABI `sysfs-devices-system-cpu`).
- Cooling devices (`sys/class/thermal/cooling_device*/type|cur_state|max_state`): a
  throttling device above state 0 is the kernel slowing a clock for heat.
- Power rails from the INA3221 monitors: JetPack 5/6 `hwmon` (`inN_label`, `inN_input`
  mV, `currN_input` mA) or JetPack 4 `ina3221x` IIO (`rail_name_N`, `in_powerN_input` mW).
- Thermal zones (`sys/class/thermal/thermal_zone*/type|temp`, m°C).
- The nvpmodel power mode: `var/lib/nvpmodel/status` (`pmode:0002 ...`) named through
  `etc/nvpmodel.conf` (`< POWER_MODEL ID=2 NAME=15W_6CORE >`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from protocol.telemetry import GpuStats

GPU_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
_GPU_DEVFREQ = re.compile(r"(\.gpu|gm20b|gp10b|gv11b|ga10b|^gpu-gpc-\d+)$")
# Fans are cooling devices too, but a spinning fan slows nothing down.
_NOT_THROTTLE = re.compile(r"fan", re.IGNORECASE)
_POWER_MODEL = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)\s*>")
_PMODE = re.compile(r"pmode:(\d+)")
_ABSENT_MILLI_C = -100_000  # -256000 marks an absent sensor


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip().rstrip("\x00")
    except OSError:
        return None


def _read_num(path: Path) -> float | None:
    text = _read(path)
    if text is None:
        return None
    try:
        v = float(text.split()[0])
    except (ValueError, IndexError):
        return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class Clock:
    cur: float
    min: float | None
    max: float | None

    @property
    def pinned(self) -> bool | None:
        """True when the governor may not move it (min == max), None when unknown."""
        if self.min is None or self.max is None:
            return None
        return self.min >= self.max

    @classmethod
    def read(cls, base: Path, cur: str, lo: str, hi: str, *, scale: float) -> Clock | None:
        value = _read_num(base / cur)
        if value is None:
            return None
        low, high = _read_num(base / lo), _read_num(base / hi)
        return cls(
            round(value * scale, 3),
            None if low is None else round(low * scale, 3),
            None if high is None else round(high * scale, 3),
        )


class JetsonSysfs:
    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)

    def _load_file(self) -> Path | None:
        for rel in GPU_LOAD_FILES:
            p = self.root / rel
            if p.is_file():
                return p
        return None

    def available(self) -> bool:
        """True on a Jetson: the integrated GPU's load file exists."""
        return self._load_file() is not None

    def board_name(self) -> str | None:
        return _read(self.root / "proc/device-tree/model") or None

    def gpu_load_pct(self) -> float | None:
        p = self._load_file()
        v = _read_num(p) if p else None
        return None if v is None else min(max(v / 10.0, 0.0), 100.0)

    def _gpu_devfreq(self) -> Path | None:
        base = self.root / "sys/class/devfreq"
        if not base.is_dir():
            return None
        for node in sorted(base.iterdir()):
            if _GPU_DEVFREQ.search(node.name) and _read_num(node / "cur_freq") is not None:
                return node
        return None

    def gpu_freq_mhz(self) -> float | None:
        node = self._gpu_devfreq()
        hz = _read_num(node / "cur_freq") if node else None
        return None if hz is None else hz / 1e6

    def gpu_clock_mhz(self) -> Clock | None:
        """The GPU's current frequency and its governor's limits, in MHz."""
        node = self._gpu_devfreq()
        if node is None:
            return None
        return Clock.read(node, "cur_freq", "min_freq", "max_freq", scale=1e-6)

    def cpu_clocks_mhz(self) -> dict[str, Clock]:
        """Per cpufreq policy (one per cluster): current frequency and limits, in MHz."""
        out: dict[str, Clock] = {}
        for pol in sorted(self.root.glob("sys/devices/system/cpu/cpufreq/policy*")):
            clock = Clock.read(pol, "scaling_cur_freq", "scaling_min_freq", "scaling_max_freq",
                               scale=1e-3)  # fmt: skip
            if clock is not None:
                out[pol.name] = clock
        return out

    def throttling(self) -> dict[str, str]:
        """Cooling devices that are slowing something down now: {type: "state/max"}."""
        out: dict[str, str] = {}
        for dev in sorted(self.root.glob("sys/class/thermal/cooling_device*")):
            kind = _read(dev / "type")
            state = _read_num(dev / "cur_state")
            if not kind or state is None or state <= 0 or _NOT_THROTTLE.search(kind):
                continue
            top = _read_num(dev / "max_state")
            out[kind] = f"{state:g}/{top:g}" if top is not None else f"{state:g}"
        return out

    def power_mw(self) -> dict[str, float]:
        rails: dict[str, float] = {}
        # JetPack 5/6: the mainline ina3221 driver under hwmon.
        for hw in sorted(self.root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")):
            for label_file in sorted(hw.glob("in*_label")):
                n = label_file.name[2:].split("_")[0]
                name = _read(label_file)
                mv, ma = _read_num(hw / f"in{n}_input"), _read_num(hw / f"curr{n}_input")
                if name and name != "NC" and mv is not None and ma is not None:
                    rails[name] = round(mv * ma / 1000.0, 1)
        # JetPack 4: the L4T ina3221x IIO driver reports mW directly.
        for dev in sorted(self.root.glob("sys/bus/i2c/drivers/ina3221x/*/iio:device*")):
            for name_file in sorted(dev.glob("rail_name_*")):
                n = name_file.name.rsplit("_", 1)[1]
                name = _read(name_file)
                mw = _read_num(dev / f"in_power{n}_input")
                if name and mw is not None:
                    rails[name] = mw
        return rails

    def temps_c(self) -> dict[str, float]:
        temps: dict[str, float] = {}
        for zone in sorted(self.root.glob("sys/class/thermal/thermal_zone*")):
            name = _read(zone / "type")
            milli = _read_num(zone / "temp")
            if name and milli is not None and milli > _ABSENT_MILLI_C:
                temps[name] = round(milli / 1000.0, 2)
        return temps

    def nvpmodel(self) -> str | None:
        status = _read(self.root / "var/lib/nvpmodel/status")
        m = _PMODE.search(status or "")
        if not m:
            return None
        mode_id = int(m[1])
        conf = _read(self.root / "etc/nvpmodel.conf") or ""
        for cm in _POWER_MODEL.finditer(conf):
            if int(cm[1]) == mode_id:
                return cm[2]
        return str(mode_id)

    def gpu_stats(self) -> GpuStats:
        t = self.temps_c()
        gpu_temp = next((v for k, v in t.items() if k.lower().startswith("gpu")), None)
        return GpuStats(
            source="sysfs",
            name=self.board_name(),
            load_pct=self.gpu_load_pct(),
            freq_mhz=self.gpu_freq_mhz(),
            power_mw=self.power_mw(),
            nvpmodel=self.nvpmodel(),
            temp_c=gpu_temp,
        )
