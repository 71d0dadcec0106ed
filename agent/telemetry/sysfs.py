"""Jetson vital signs straight from sysfs, for when `tegrastats` is missing or not allowed.

Every path is read under `root` (default `/`), so tests feed a recorded tree. What we read:

- GPU load: `sys/devices/gpu.0/load` (JetPack 4) or `sys/devices/platform/gpu.0/load`
  (JetPack 5/6), in per mille; GPU frequency from the GPU's devfreq node
  (`sys/class/devfreq/57000000.gpu` on Nano, `17000000.gv11b` on Xavier,
  `17000000.ga10b` / `17000000.gpu` on Orin) in Hz.
- Power rails from the INA3221 monitors: JetPack 5/6 `hwmon` (`inN_label`, `inN_input`
  mV, `currN_input` mA) or JetPack 4 `ina3221x` IIO (`rail_name_N`, `in_powerN_input` mW).
- Thermal zones (`sys/class/thermal/thermal_zone*/type|temp`, m°C).
- The nvpmodel power mode: `var/lib/nvpmodel/status` (`pmode:0002 ...`) named through
  `etc/nvpmodel.conf` (`< POWER_MODEL ID=2 NAME=15W_6CORE >`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from protocol.telemetry import GpuStats

GPU_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load")
_GPU_DEVFREQ = re.compile(r"(\.gpu|gm20b|gp10b|gv11b|ga10b)$")
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

    def gpu_freq_mhz(self) -> float | None:
        base = self.root / "sys/class/devfreq"
        if not base.is_dir():
            return None
        for node in sorted(base.iterdir()):
            if _GPU_DEVFREQ.search(node.name):
                hz = _read_num(node / "cur_freq")
                if hz is not None:
                    return hz / 1e6
        return None

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
