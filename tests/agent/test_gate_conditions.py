"""The speed gate refuses to judge across a clock or thermal change, and judges when stable.

The board is a recorded AGX Orin sysfs tree (tests/fixtures/jetson/agx-orin-r36.4.0,
JetPack 6.1, MAXN with `jetson_clocks`: GPU and CPU clocks pinned); the engines are real
ONNX Runtime engines timed for real. `ReplayedBoard` is the only fake: a Jetson whose
files move from one recorded tree to the next at each snapshot, so "the GPU clock fell
from 1300.5 to 918 MHz during the run" happens at a known point instead of by chance.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.engines import select_backend
from agent.engines.cache import EngineCache
from agent.gate import ConditionsWatch, SpeedSettings, run_gate
from agent.telemetry.conditions import changes, read_conditions
from agent.telemetry.sysfs import JetsonSysfs
from protocol.manifest import BuildOptions, GateSpec
from tests.models import make_golden, make_mlp, mlp_inputs, write_golden

ORIN = Path(__file__).parent.parent / "fixtures" / "jetson" / "agx-orin-r36.4.0"
GPU = "sys/class/devfreq/17000000.gpu"
QUICK = SpeedSettings(time_budget_s=1.0, warmup_s=0.05, retry_wait_s=0.0)


class ReplayedBoard(JetsonSysfs):
    """A Jetson replaying recorded trees: snapshot i reads trees[i] (the last one repeats).

    `read_conditions` starts every snapshot with `nvpmodel()`, which turns the page.
    """

    def __init__(self, trees: list[Path]) -> None:
        super().__init__(trees[0])
        self.trees = trees
        self.snapshots = 0

    def nvpmodel(self) -> str | None:
        self.root = self.trees[min(self.snapshots, len(self.trees) - 1)]
        self.snapshots += 1
        return super().nvpmodel()


def board(tmp: Path, name: str, files: dict[str, str] | None = None) -> Path:
    """A copy of the recorded Orin tree with some of its files rewritten."""
    root = tmp / name
    shutil.copytree(ORIN, root)
    for rel, text in (files or {}).items():
        (root / rel).write_text(text + "\n")
    return root


def throttled(tmp: Path, name: str = "throttled") -> Path:
    # The GPU held at 918 MHz (one of Orin's devfreq steps) with its limits unchanged:
    # what a pinned clock looks like when something outside the gate pulls it down.
    return board(tmp, name, {f"{GPU}/cur_freq": "918000000"})


# The tests share a module-scoped fixture: under xdist one worker runs them all.
pytestmark = pytest.mark.xdist_group("test_gate_conditions")


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cond")
    backend = select_backend("onnxruntime")
    cache = EngineCache(d / "engines", 1 << 30)
    model = make_mlp(d / "m.onnx", in_dim=64, hidden=128, out_dim=16, layers=2)
    feeds = mlp_inputs(batch=4, in_dim=64)
    return {
        "a": cache.get_or_build(backend, model, "a" * 64, BuildOptions()),
        "b": cache.get_or_build(backend, model, "b" * 64, BuildOptions()),
        "golden": write_golden(d / "golden.npz", make_golden(model, feeds)),
    }


def test_a_recorded_orin_reads_as_maxn_with_pinned_clocks() -> None:
    c = read_conditions(JetsonSysfs(ORIN))
    assert c.power_mode == "MAXN" and c.clocks_pinned is True
    assert c.gpu is not None and c.gpu.cur == c.gpu.min == c.gpu.max == 1300.5
    assert sorted(c.cpus) == ["policy0", "policy4", "policy8"]
    assert all(p.cur == 2201.6 and p.pinned for p in c.cpus.values())
    assert c.temps_c["gpu-thermal"] == 48.0 and c.temps_c["tj-thermal"] == 48.22
    assert c.throttling == {}  # the fan spins (state 3 of 10): cooling, not throttling


def test_each_kind_of_change_is_named(tmp_path: Path) -> None:
    base = read_conditions(JetsonSysfs(ORIN))

    def after(files: dict[str, str] | None = None) -> list[str]:
        root = board(tmp_path, f"t{len(list(tmp_path.iterdir()))}", files)
        return changes(base, read_conditions(JetsonSysfs(root)), max_temp_rise_c=10.0)

    assert after({"var/lib/nvpmodel/status": "pmode:0001 fmode:quiet"}) == [
        "power mode MAXN -> MODE_15W"
    ]
    assert after({f"{GPU}/cur_freq": "918000000"}) == ["gpu 1300.5 -> 918 MHz"]
    # `jetson_clocks --restore`: the minimum drops back, the governor is free again.
    assert after({f"{GPU}/min_freq": "306000000"}) == [
        "clocks pinned -> not pinned",
        "gpu limits 1300.5-1300.5 -> 306-1300.5 MHz",
    ]
    assert after({"sys/class/thermal/thermal_zone1/temp": "61500"}) == ["gpu-thermal 48 -> 61.5 C"]
    assert after({"sys/class/thermal/thermal_zone1/temp": "55000"}) == []  # within 10 °C
    assert after() == []


def test_under_dvfs_a_moving_clock_is_normal_but_a_moving_limit_is_not(tmp_path: Path) -> None:
    lo = {f"{GPU}/min_freq": "306000000"}
    free = board(tmp_path, "free", {**lo, f"{GPU}/cur_freq": "306000000"})
    busy = board(tmp_path, "busy", lo)  # DVFS ramped the GPU up to its maximum
    capped = board(tmp_path, "capped", {**lo, f"{GPU}/max_freq": "918000000"})
    a = read_conditions(JetsonSysfs(free))
    assert a.clocks_pinned is False
    assert changes(a, read_conditions(JetsonSysfs(busy)), max_temp_rise_c=10) == []
    assert changes(a, read_conditions(JetsonSysfs(capped)), max_temp_rise_c=10) == [
        "gpu limits 306-1300.5 -> 306-918 MHz"
    ]


def test_throttling_by_a_cooling_device_is_a_thermal_change(tmp_path: Path) -> None:
    # Tegra SOCTHERM's hardware throttle levels appear as cooling devices named after
    # their device-tree nodes, "light" and "heavy" (kernel binding nvidia,tegra124-soctherm).
    hot = board(tmp_path, "hot")
    dev = hot / "sys/class/thermal/cooling_device1"
    dev.mkdir()
    (dev / "type").write_text("heavy\n")
    (dev / "cur_state").write_text("1\n")
    (dev / "max_state").write_text("1\n")
    moved = changes(read_conditions(JetsonSysfs(ORIN)), read_conditions(JetsonSysfs(hot)),
                    max_temp_rise_c=10)  # fmt: skip
    assert moved == ["throttling started (heavy 1/1)"]


def test_a_clock_drop_mid_run_is_not_judged_then_the_stable_rerun_is(
    tmp_path: Path, engines: dict[str, Path]
) -> None:
    # Snapshot 0 (before the first run) sees the pinned 1300.5 MHz; every later one sees
    # 918 MHz: the first run straddles the drop, the second runs wholly at 918 MHz.
    b = ReplayedBoard([ORIN, throttled(tmp_path)])
    heard: list[tuple[int, int, list[str], float]] = []
    r = run_gate(select_backend("onnxruntime"), engines["b"], engines["a"], engines["golden"],
                 GateSpec(), speed=QUICK, watch=ConditionsWatch(b),
                 on_not_judged=lambda *a: heard.append(a))  # fmt: skip
    assert heard == [(1, 3, ["gpu 1300.5 -> 918 MHz"], 0.0)]
    assert r.passed, r.reason
    assert r.figures["speed_attempts"] == 2
    assert r.figures["speed"]["comparison"]["verdict"] != "regression"
    cond = r.figures["speed"]["conditions"]
    assert cond["before"]["gpu"]["cur"] == cond["after"]["gpu"]["cur"] == 918.0
    assert cond["before"]["power_mode"] == "MAXN" and cond["before"]["clocks_pinned"] is True


def test_clocks_that_never_settle_end_in_not_judged_after_the_allowed_runs(
    tmp_path: Path, engines: dict[str, Path]
) -> None:
    # The clock flips at every snapshot: no run can be judged.
    low = throttled(tmp_path)
    b = ReplayedBoard([ORIN, low] * 20)
    heard: list[int] = []
    r = run_gate(select_backend("onnxruntime"), engines["b"], engines["a"], engines["golden"],
                 GateSpec(), speed=SpeedSettings(time_budget_s=1.0, warmup_s=0.05, attempts=2,
                                                 retry_wait_s=0.0),
                 watch=ConditionsWatch(b), on_not_judged=lambda n, *_: heard.append(n))  # fmt: skip
    assert heard == [1, 2]
    assert not r.passed and r.code == "not_judged"
    assert r.reason is not None and r.reason.startswith("not judged: clocks changed (gpu ")
    assert "no verdict on the model" in r.reason
    assert r.figures["not_judged"] == [["gpu 1300.5 -> 918 MHz"]] * 2
    assert "comparison" not in r.figures["speed"]  # no verdict from samples across a change


def test_off_a_jetson_nothing_can_move_and_the_gate_judges_as_before(
    tmp_path: Path, engines: dict[str, Path]
) -> None:
    r = run_gate(select_backend("onnxruntime"), engines["b"], engines["a"], engines["golden"],
                 GateSpec(), speed=QUICK, watch=ConditionsWatch(JetsonSysfs(tmp_path)))  # fmt: skip
    assert r.passed, r.reason
    assert r.figures["speed_attempts"] == 1
    before = r.figures["speed"]["conditions"]["before"]
    assert before["power_mode"] is None and before["clocks_pinned"] is None


def test_latency_spread_is_reported_and_warned_past_one_percent_like_trtexec(
    engines: dict[str, Path],
) -> None:
    r = run_gate(select_backend("onnxruntime"), engines["b"], None, engines["golden"],
                 GateSpec(), speed=QUICK)  # fmt: skip
    cand = r.figures["speed"]["candidate"]
    samples_cv = cand["cv_pct"]
    assert samples_cv is not None and samples_cv >= 0
    warned = r.figures["speed"].get("warnings", [])
    assert bool(warned) == (samples_cv > 1.0)
    if warned:
        assert "coefficient of variation" in warned[0] and "jetson_clocks" in warned[0]
    assert np.isfinite(samples_cv)


def test_thor_on_jetpack7_exposes_its_gpu_clock_as_gpu_gpc_0(tmp_path: Path) -> None:
    # JetPack 7.2 on AGX Thor: the GPU's devfreq node is gpu-gpc-0 (jetson_stats #885);
    # no legacy load file. The frequencies here are illustrative; the layout is not.
    node = tmp_path / "sys/class/devfreq/gpu-gpc-0"
    node.mkdir(parents=True)
    for name, hz in [("cur_freq", 1575000000), ("min_freq", 1575000000), ("max_freq", 1575000000)]:
        (node / name).write_text(f"{hz}\n")
    c = read_conditions(JetsonSysfs(tmp_path))
    assert c.gpu is not None and c.gpu.cur == 1575.0 and c.clocks_pinned is True
