"""The speed half of the gate: real timing of real engines on this (shared, noisy) CPU.

The slower model computes the same outputs plus a side branch of genuine extra matmuls
(tests/models.make_mlp extra_work), so only the time differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.engines import select_backend
from agent.engines.cache import EngineCache
from agent.gate import SpeedSettings, run_gate
from agent.gate.stats import median_interval
from protocol.manifest import BuildOptions, GateSpec
from tests.models import make_golden, make_mlp, mlp_inputs, write_golden

DIMS = {"in_dim": 256, "hidden": 512, "out_dim": 64, "layers": 3}
QUICK = SpeedSettings(time_budget_s=3.0, warmup_s=0.1)


# Speed verdicts: timed on an idle machine, in the serial pass (scripts/test).
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speed")
    backend = select_backend("onnxruntime")
    cache = EngineCache(d / "engines", 1 << 30)
    base = make_mlp(d / "base.onnx", **DIMS)  # type: ignore[arg-type]
    slow = make_mlp(d / "slow.onnx", extra_work=0.6, **DIMS)  # type: ignore[arg-type]
    feeds = mlp_inputs(batch=16, in_dim=DIMS["in_dim"])
    gold = make_golden(base, feeds)
    assert np.array_equal(gold["output.y"], make_golden(slow, feeds)["output.y"])
    return {
        "base": cache.get_or_build(backend, base, "a" * 64, BuildOptions()),
        "base_copy": cache.get_or_build(backend, base, "b" * 64, BuildOptions()),
        "slow": cache.get_or_build(backend, slow, "c" * 64, BuildOptions()),
        "golden": write_golden(d / "golden.npz", gold),
    }


def test_same_engine_against_itself_is_no_regression(engines: dict[str, Path]) -> None:
    backend = select_backend("onnxruntime")
    r = run_gate(backend, engines["base_copy"], engines["base"], engines["golden"], GateSpec(),
                 speed=QUICK)  # fmt: skip
    assert r.passed, r.reason
    cmp_ = r.figures["speed"]["comparison"]
    assert cmp_["verdict"] in ("no_regression", "within_allowance", "not_significant")
    assert abs(cmp_["median_change_pct"]) < 10
    for who in ("candidate", "active"):
        fig = r.figures["speed"][who]
        assert 0 < fig["p50_ms"] <= fig["p90_ms"] <= fig["p99_ms"]
        assert fig["throughput_ips"] > 0
    assert r.p99_ms == r.figures["speed"]["candidate"]["p99_ms"]


def test_genuinely_slower_model_is_caught_and_the_verdict_says_by_how_much(
    engines: dict[str, Path],
) -> None:
    active = engines["base"]
    before = active.read_bytes()
    backend = select_backend("onnxruntime")
    r = run_gate(backend, engines["slow"], active, engines["golden"], GateSpec(),
                 speed=QUICK)  # fmt: skip
    assert not r.passed and r.code == "latency_regression"
    cmp_ = r.figures["speed"]["comparison"]
    assert cmp_["verdict"] in ("regression", "regression_by_median")
    assert cmp_["median_change_pct"] > 10 and cmp_["ci_change_pct"][0] > 0
    assert r.reason is not None and "slower than the active engine by" in r.reason
    assert r.figures["accuracy"]["passed"], "same outputs: only the speed differs"
    assert active.read_bytes() == before  # the gate never touches the active engine


def test_a_generous_allowance_lets_the_slower_model_through(engines: dict[str, Path]) -> None:
    backend = select_backend("onnxruntime")
    r = run_gate(backend, engines["slow"], engines["base"], engines["golden"],
                 GateSpec(max_regression_pct=400), speed=QUICK)  # fmt: skip
    assert r.passed, r.reason


def test_absolute_budget_applies_without_an_active_engine(engines: dict[str, Path]) -> None:
    backend = select_backend("onnxruntime")
    ok = run_gate(backend, engines["base"], None, engines["golden"], GateSpec(latency_p99_ms=5000),
                  speed=QUICK)  # fmt: skip
    assert ok.passed and "comparison" not in ok.figures["speed"]
    p99 = run_gate(backend, engines["base"], None, engines["golden"],
                   GateSpec(latency_p99_ms=1e-4), speed=QUICK)  # fmt: skip
    assert (
        not p99.passed and p99.code == "latency_budget" and "over the budget" in (p99.reason or "")
    )
    tput = run_gate(backend, engines["base"], None, engines["golden"],
                    GateSpec(min_throughput=1e9), speed=QUICK)  # fmt: skip
    assert not tput.passed and tput.code == "throughput"


def test_median_interval_covers_and_excludes_as_it_should() -> None:
    rng = np.random.default_rng(0)
    assert median_interval(np.ones(5)).low == -np.inf  # too few for a 99% interval
    misses = 0
    for _ in range(200):
        iv = median_interval(rng.standard_normal(101))
        misses += not (iv.low <= 0.0 <= iv.high)
    assert misses <= 8  # 99% nominal: ~2 of 200 expected
    shifted = median_interval(rng.standard_normal(400) * 0.05 + np.log(1.3))
    assert shifted.low > np.log(1.1)


def test_a_corrupt_active_engine_falls_back_to_the_absolute_budget(
    engines: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from agent.engines.sidecar import sidecar_path

    broken = tmp_path / "engine"
    shutil.copy(engines["base"], broken)
    shutil.copy(sidecar_path(engines["base"]), sidecar_path(broken))
    broken.write_bytes(broken.read_bytes()[:-10])
    backend = select_backend("onnxruntime")
    r = run_gate(backend, engines["slow"], broken, engines["golden"], GateSpec(), speed=QUICK)
    assert r.passed and r.figures["compared_with_active"] is False
    assert "corrupt" in r.figures["active_unavailable"]
