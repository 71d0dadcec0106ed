"""The tegrastats parser on real lines of several boards and JetPack releases, and the
reader that runs tegrastats as a subprocess (a stand-in script replays a recorded line)."""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path

import pytest

from agent.telemetry.tegrastats import (
    TegrastatsParseError,
    TegrastatsReader,
    parse_tegrastats,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "tegrastats"


def fixture_lines(name: str) -> list[str]:
    text = (FIXTURES / name).read_text()
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def all_fixture_lines() -> list[tuple[str, str]]:
    return [(f.name, ln) for f in sorted(FIXTURES.glob("*.txt")) for ln in fixture_lines(f.name)]


def test_every_fixture_names_its_source_url() -> None:
    files = sorted(FIXTURES.glob("*.txt"))
    assert len(files) >= 4
    for f in files:
        header = [ln for ln in f.read_text().splitlines() if ln.startswith("#")]
        assert any("source: https://" in ln for ln in header), f.name
        assert fixture_lines(f.name), f"{f.name} holds no tegrastats line"


@pytest.mark.parametrize(("name", "line"), all_fixture_lines())
def test_every_fixture_line_parses_with_memory_cpu_and_gpu_load(name: str, line: str) -> None:
    r = parse_tegrastats(line)
    assert r.ram_used_mb is not None and r.ram_total_mb is not None
    assert 0 < r.ram_used_mb < r.ram_total_mb
    assert r.cpu_pct, name
    assert all(p is None or 0 <= p <= 100 for p in r.cpu_pct)
    assert r.gpu_load_pct is not None and 0 <= r.gpu_load_pct <= 100
    assert all(t > -100 for t in r.temps_c.values())
    assert not {"RAM", "SWAP", "IRAM", "NC"} & r.power_mw.keys()


def test_nano_jetpack4_rails_without_unit_and_gpu_frequency() -> None:
    (line,) = fixture_lines("nano_jp4.txt")
    r = parse_tegrastats(line)
    assert (r.ram_used_mb, r.ram_total_mb, r.swap_used_mb) == (1180, 3965, 149)
    assert r.cpu_pct == [30, 33, 28, 26] and r.cpu_freq_mhz == [1036] * 4
    assert (r.gpu_load_pct, r.gpu_freq_mhz) == (0, 76)
    assert (r.emc_pct, r.emc_freq_mhz) == (10, 1600)
    assert r.power_mw == {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078}
    assert r.power_avg_mw["POM_5V_IN"] == 4680
    assert r.temps_c["GPU"] == 59 and r.temps_c["thermal"] == 59.75
    assert "PMIC" not in r.temps_c  # a constant placeholder, not a sensor


def test_orin_nano_jetpack6_mw_rails_date_prefix_and_bracketed_frequency() -> None:
    (line,) = fixture_lines("orin_nano_jp6.txt")
    r = parse_tegrastats(line)
    assert r.ram_total_mb == 7620 and len(r.cpu_pct) == 6
    assert r.cpu_freq_mhz[-1] == 247
    assert (r.gpu_load_pct, r.gpu_freq_mhz) == (84, 713)
    assert (r.emc_pct, r.emc_freq_mhz) == (18, 3199)
    assert r.power_mw == {"VDD_IN": 17946, "VDD_CPU_GPU_CV": 8896, "VDD_SOC": 3923}
    assert r.temps_c["gpu"] == 63.5 and r.temps_c["tj"] == 65.562
    # Engines such as NVENC 1%@115 are neither rails nor the GPU.
    assert "NVENC" not in r.power_mw and r.gpu_load_pct == 84


def test_agx_orin_drops_absent_sensors_and_unconnected_rails() -> None:
    (line,) = fixture_lines("agx_orin_jp5.txt")
    r = parse_tegrastats(line)
    assert len(r.cpu_pct) == 12
    assert "GPU" not in r.temps_c and "CV0" not in r.temps_c  # printed as -256C
    assert r.temps_c["tj"] == 44.343
    assert r.power_mw == {
        "VDD_GPU_SOC": 2340,
        "VDD_CPU_CV": 390,
        "VIN_SYS_5V0": 4025,
        "VDDQ_VDD2_1V8AO": 301,
    }
    assert (r.gpu_load_pct, r.gpu_freq_mhz) == (0, 0)


def test_agx_orin_jetpack7_load_and_per_gpc_array_numbered_engines_and_max_columns() -> None:
    (line,) = fixture_lines("agx_orin_jp7.txt")
    r = parse_tegrastats(line)
    assert r.ram_total_mb == 62817 and len(r.cpu_pct) == 12 and r.cpu_freq_mhz[0] == 2201
    # GR3D_FREQ 12%@[1300,1300]: the load AND both GPC clocks (jtop dropped the clock, #894).
    assert (r.gpu_load_pct, r.gpu_freq_mhz) == (12, 1300)
    assert (r.emc_pct, r.emc_freq_mhz) == (3, 3199)
    assert r.temps_c == {"cpu": 52.968, "soc2": 48.406, "soc0": 49.531, "gpu": 47.625}
    assert r.power_mw == {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500}
    assert "NVENC0" not in r.power_mw and "NVDLA0" not in r.power_mw  # engines, "off"


def test_thor_gpc_array_without_a_load_gives_the_clock_and_no_load() -> None:
    # Thor on JetPack 7 prints GR3D_FREQ @[f,f,f]: three GPC clocks, no utilization (the
    # form jetson_stats parses for Thor: jtop/tests/test_06_tegra_parse.py).
    r = parse_tegrastats(
        "RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ @[1000,1000,1000]"
    )
    assert (r.gpu_load_pct, r.gpu_freq_mhz) == (None, 1000)


def test_agx_xavier_jetpack42_bare_rail_names_do_not_clash_with_sensors() -> None:
    (line,) = fixture_lines("agx_xavier_jp42.txt")
    r = parse_tegrastats(line)
    assert r.power_mw["GPU"] == 463 and r.power_mw["SYS5V"] == 3306
    assert r.temps_c["GPU"] == 30.5
    assert r.gpu_freq_mhz is None and r.emc_freq_mhz is None


def test_offline_cores_are_none_not_zero() -> None:
    r = parse_tegrastats(fixture_lines("tx2_jp46.txt")[0])
    assert r.cpu_pct == [3, None, None, 0, 1, 1]
    assert r.power_mw == {}


def test_two_gpcs_and_later_max_columns() -> None:
    # Orin NX prints one GR3D per GPC; newer releases add a max column to rails and sensors.
    r = parse_tegrastats(
        "RAM 2000/15000MB CPU [1%@1000,2%@1000] GR3D_FREQ 10%@114 GR3D2_FREQ 30%@114 "
        "cpu@51.9C/52.9C VDD_IN 5000mW/4900mW/5200mW"
    )
    assert r.gpu_load_pct == 30
    assert r.temps_c == {"cpu": 51.9}
    assert r.power_mw == {"VDD_IN": 5000} and r.power_avg_mw == {"VDD_IN": 4900}


@pytest.mark.parametrize("bad", ["", "hello world", "tegrastats: permission denied"])
def test_a_line_that_is_not_tegrastats_is_refused_with_the_text(bad: str) -> None:
    with pytest.raises(TegrastatsParseError, match="not a tegrastats line"):
        parse_tegrastats(bad)


def _replay_script(tmp_path: Path, lines: list[str]) -> Path:
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(lines) + "\n")
    script = tmp_path / "tegrastats"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        f"lines = open({str(data)!r}).read().splitlines()\n"
        "for ln in lines:\n"
        "    print(ln, flush=True)\n"
        "    time.sleep(0.05)\n"
        "time.sleep(60)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_reader_keeps_the_latest_line_and_skips_garbage(tmp_path: Path) -> None:
    nano = fixture_lines("nano_jp4.txt")[0]
    orin = fixture_lines("orin_nano_jp6.txt")[0]
    script = _replay_script(tmp_path, [nano, "garbage that is not tegrastats", orin])
    reader = TegrastatsReader(interval_s=0.1, command=[str(script)])
    reader.start()
    try:
        assert reader.wait_first(10) is not None
        deadline_ok = False
        for _ in range(200):
            r = reader.latest()
            if r is not None and r.ram_total_mb == 7620:
                deadline_ok = True
                break
            time.sleep(0.02)
        assert deadline_ok, "the reader never moved on to the newest line"
        assert reader.parse_errors == 1
        assert reader.running
    finally:
        reader.stop()
    assert not reader.running


def test_reader_without_tegrastats_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.telemetry.tegrastats.find_tegrastats", lambda: None)
    with pytest.raises(FileNotFoundError, match="tegrastats is not installed"):
        TegrastatsReader()
