"""The sampler: real psutil figures, Jetson sysfs trees laid out as the boards have them,
tegrastats replayed from recorded lines, NVML replayed from a sample recorded on a GPU."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.telemetry.nvml import to_gpu_stats
from agent.telemetry.sampler import TelemetrySampler
from agent.telemetry.sysfs import JetsonSysfs
from agent.telemetry.tegrastats import TegrastatsReader
from protocol.errors import MessageError
from protocol.telemetry import TelemetrySample

FIXTURES = Path(__file__).parent.parent / "fixtures"
NVML_SAMPLE = FIXTURES / "nvml" / "h100_sample.json"


def view() -> dict[str, Any]:
    return {
        "device_id": "robot-0042",
        "uptime_s": 812.5,
        "models": {"detector": {"version": "1.4.0", "p50_ms": 3.1, "p99_ms": 7.9, "count": 512}},
        "jobs": {"done": 7, "failed": 1},
    }


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def xavier_nx_jp5_tree(root: Path) -> Path:
    """The layout of a Xavier NX on JetPack 5 (mainline ina3221 under hwmon, channel 7 is
    the shunt-voltage sum with no current), as jtop and alumet document it."""
    hw = "sys/bus/i2c/drivers/ina3221/7-0040/hwmon/hwmon4"
    for n, (label, mv, ma) in enumerate(
        [("VDD_IN", 5032, 1008), ("VDD_CPU_GPU_CV", 5024, 200), ("VDD_SOC", 5024, 264)], 1
    ):
        write(root, f"{hw}/in{n}_label", label + "\n")
        write(root, f"{hw}/in{n}_input", f"{mv}\n")
        write(root, f"{hw}/curr{n}_input", f"{ma}\n")
    write(root, f"{hw}/in7_label", "sum of shunt voltages\n")
    write(root, f"{hw}/in7_input", "12\n")
    write(root, "sys/devices/platform/gpu.0/load", "537\n")
    write(root, "sys/class/devfreq/17000000.gv11b/cur_freq", "1109250000\n")
    write(root, "sys/class/devfreq/3d00000.nvdla0/cur_freq", "1000\n")  # not the GPU
    for i, (name, milli) in enumerate(
        [("CPU-therm", 41500), ("GPU-therm", 40000), ("AUX-therm", 40500), ("PMIC-Die", -256000)]
    ):
        write(root, f"sys/class/thermal/thermal_zone{i}/type", name + "\n")
        write(root, f"sys/class/thermal/thermal_zone{i}/temp", f"{milli}\n")
    write(root, "proc/device-tree/model", "NVIDIA Jetson Xavier NX Developer Kit\x00")
    write(root, "var/lib/nvpmodel/status", "pmode:0002 fmode:quiet\n")
    write(
        root,
        "etc/nvpmodel.conf",
        "< POWER_MODEL ID=0 NAME=MODE_15W_2CORE >\nCPU_ONLINE CORE_0 1\n"
        "< POWER_MODEL ID=2 NAME=MODE_15W_6CORE >\nCPU_ONLINE CORE_0 1\n",
    )
    return root


def nano_jp4_tree(root: Path) -> Path:
    """Jetson Nano on JetPack 4: the L4T ina3221x IIO driver reports mW per rail."""
    iio = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (name, mw) in enumerate([("POM_5V_IN", 2459), ("POM_5V_GPU", 41), ("POM_5V_CPU", 409)]):
        write(root, f"{iio}/rail_name_{n}", name + "\n")
        write(root, f"{iio}/in_power{n}_input", f"{mw}\n")
    write(root, "sys/devices/gpu.0/load", "1000\n")
    write(root, "sys/class/devfreq/57000000.gpu/cur_freq", "921600000\n")
    return root


def test_xavier_nx_sysfs_tree_gives_load_frequency_rails_temps_and_mode(tmp_path: Path) -> None:
    fs = JetsonSysfs(xavier_nx_jp5_tree(tmp_path))
    assert fs.available()
    g = fs.gpu_stats()
    assert g.source == "sysfs" and g.name == "NVIDIA Jetson Xavier NX Developer Kit"
    assert g.load_pct == pytest.approx(53.7)
    assert g.freq_mhz == pytest.approx(1109.25)
    assert g.power_mw == {"VDD_IN": 5072.3, "VDD_CPU_GPU_CV": 1004.8, "VDD_SOC": 1326.3}
    assert g.input_power_mw == 5072.3
    assert g.nvpmodel == "MODE_15W_6CORE"
    assert g.temp_c == 40.0
    assert "PMIC-Die" not in fs.temps_c()  # -256 °C: absent


def test_nano_jetpack4_iio_rails(tmp_path: Path) -> None:
    g = JetsonSysfs(nano_jp4_tree(tmp_path)).gpu_stats()
    assert g.power_mw == {"POM_5V_IN": 2459, "POM_5V_GPU": 41, "POM_5V_CPU": 409}
    assert g.load_pct == 100 and g.freq_mhz == pytest.approx(921.6)
    assert g.nvpmodel is None


def test_a_machine_without_gpu_reports_an_explicit_null(tmp_path: Path) -> None:
    s = TelemetrySampler(tmp_path / "data", view, gpu="none", sysfs_root=tmp_path)
    sample = s.sample()
    s.close()
    wire = json.loads(sample.encode())
    assert "gpu" in wire and wire["gpu"] is None
    assert wire["schema"] == "jetfleet.telemetry/v1"
    assert wire["device_id"] == "robot-0042" and wire["uptime_s"] == 812.5
    assert len(wire["cpu"]["percent"]) == psutil.cpu_count()
    assert wire["mem"]["total"] == psutil.virtual_memory().total
    assert wire["disk_free_bytes"] > 0  # data dir does not exist yet: its parent counts
    assert wire["models"]["detector"]["p99_ms"] == 7.9
    assert wire["jobs"] == {"done": 7, "failed": 1}
    assert TelemetrySample.decode(sample.encode()) == sample
    assert b" " not in sample.encode().split(b'"at"')[0]  # compact JSON


def test_auto_picks_sysfs_on_a_jetson_without_tegrastats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.telemetry.sampler.find_tegrastats", lambda: None)
    root = xavier_nx_jp5_tree(tmp_path / "root")
    s = TelemetrySampler(tmp_path, view, sysfs_root=root)
    sample = s.sample()
    s.close()
    assert s.source == "sysfs"
    assert sample.gpu is not None and sample.gpu.power_mw["VDD_IN"] == 5072.3
    assert sample.temps["GPU-therm"] == 40.0


def test_tegrastats_source_fills_gpu_rails_and_temps(tmp_path: Path) -> None:
    line = next(
        ln
        for ln in (FIXTURES / "tegrastats" / "orin_nano_jp6.txt").read_text().splitlines()
        if not ln.startswith("#")
    )
    script = tmp_path / "tegrastats"
    script.write_text(
        f"#!{sys.executable}\nimport time\nwhile True:\n    print({line!r}, flush=True)\n"
        "    time.sleep(0.1)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    reader = TegrastatsReader(0.1, command=[str(script)])
    root = xavier_nx_jp5_tree(tmp_path / "root")
    s = TelemetrySampler(tmp_path, view, tegrastats=reader, sysfs_root=root)
    try:
        assert reader.wait_first(10) is not None
        sample = s.sample()
    finally:
        s.close()
    assert s.source == "tegrastats" and not reader.running
    g = sample.gpu
    assert g is not None and g.source == "tegrastats"
    assert (g.load_pct, g.freq_mhz, g.emc_pct) == (84, 713, 18)
    assert g.power_mw["VDD_IN"] == 17946 and g.nvpmodel == "MODE_15W_6CORE"
    assert g.temp_c == 63.5 and sample.temps["tj"] == 65.562


def test_a_broken_gpu_source_leaves_gpu_null_and_the_sample_still_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.telemetry.sampler.find_tegrastats", lambda: None)
    root = xavier_nx_jp5_tree(tmp_path / "root")
    s = TelemetrySampler(tmp_path, view, sysfs_root=root)

    def boom() -> None:
        raise OSError("EIO reading the GPU load")

    monkeypatch.setattr(s.sysfs, "gpu_stats", boom)
    sample = s.sample()
    assert sample.gpu is None and sample.mem is not None


def test_a_view_without_device_id_is_refused_with_the_field_named(tmp_path: Path) -> None:
    s = TelemetrySampler(tmp_path, lambda: {}, gpu="none")
    with pytest.raises(MessageError, match="device_id"):
        s.sample()


def test_nvml_sample_recorded_on_a_real_gpu_converts_and_travels() -> None:
    if not NVML_SAMPLE.is_file():
        pytest.skip(f"{NVML_SAMPLE} not recorded yet: run bench/nvml_probe.py on a GPU machine")
    recorded = json.loads(NVML_SAMPLE.read_text())
    g = to_gpu_stats(recorded["raw"])
    assert g.model_dump(mode="json") == recorded["gpu"]
    assert g.source == "nvml" and g.name and g.mem_total and g.mem_total > 0
    assert g.power_mw["board"] > 0
    assert 0 <= (g.load_pct or 0) <= 100 and g.temp_c is not None
    sample = TelemetrySample.new(
        device_id="gpu-host-1", at="2026-11-25T07:00:00Z", uptime_s=1, gpu=g
    )
    assert TelemetrySample.decode(sample.encode()).gpu == g
