"""The accuracy half of the gate, on real engines and golden files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.engines import select_backend
from agent.engines.cache import EngineCache
from agent.gate import run_gate
from agent.gate.accuracy import check_accuracy
from agent.gate.golden import load_golden
from protocol.errors import BundleError
from protocol.manifest import BuildOptions, GateSpec
from tests.models import (
    convnet_inputs,
    make_convnet,
    make_golden,
    make_mlp,
    mlp_inputs,
    write_golden,
)

FAST = GateSpec(max_regression_pct=10.0)
TOL = GateSpec(atol=1e-3, rtol=1e-3)


@pytest.fixture
def built(tmp_path: Path):  # type: ignore[no-untyped-def]
    backend = select_backend("onnxruntime")
    cache = EngineCache(tmp_path / "engines", 1 << 30)

    def build(model: Path, sha: str) -> Path:
        return cache.get_or_build(backend, model, sha, BuildOptions())

    return backend, build


def test_correct_convnet_passes_and_reports_its_error_figures(tmp_path: Path, built) -> None:  # type: ignore[no-untyped-def]
    backend, build = built
    model = make_convnet(tmp_path / "c.onnx")
    golden = write_golden(tmp_path / "g.npz", make_golden(model, convnet_inputs()))
    result = run_gate(backend, build(model, "1" * 64), None, golden, FAST)
    assert result.passed and result.code is None and result.reason is None
    acc = result.figures["accuracy"]
    assert acc["passed"] and acc["outputs"]["logits"]["max_abs_err"] <= 1e-4
    json.dumps(result.figures, allow_nan=False)  # the figures travel in a JSON event


def test_golden_from_another_model_fails_accuracy_naming_output_and_element(
    tmp_path: Path,
    built,  # type: ignore[no-untyped-def]
) -> None:
    backend, build = built
    model = make_mlp(tmp_path / "m.onnx", seed=0)
    other = make_mlp(tmp_path / "other.onnx", seed=7)
    golden = write_golden(tmp_path / "g.npz", make_golden(other, mlp_inputs()))
    result = run_gate(backend, build(model, "2" * 64), None, golden, FAST)
    assert not result.passed and result.code == "accuracy"
    worst = result.figures["accuracy"]["worst"]
    assert worst["output"] == "y" and len(worst["index"]) == 2
    assert result.reason is not None and "output 'y'" in result.reason
    assert f"index {worst['index']}" in result.reason
    assert "speed" not in result.figures  # no point timing a wrong model


def test_fp16_weight_rounding_fails_a_tight_tolerance_and_passes_a_loose_one(
    tmp_path: Path,
    built,  # type: ignore[no-untyped-def]
) -> None:
    backend, build = built
    ref = make_mlp(tmp_path / "fp32.onnx", hidden=256)
    lossy = make_mlp(tmp_path / "fp16.onnx", hidden=256, weight_precision="fp16")
    golden = write_golden(tmp_path / "g.npz", make_golden(ref, mlp_inputs()))
    engine = build(lossy, "3" * 64)
    tight = run_gate(backend, engine, None, golden, GateSpec(atol=1e-6, rtol=1e-6))
    assert not tight.passed and tight.code == "accuracy"
    abs_err = tight.figures["accuracy"]["worst"]["abs_err"]
    assert 1e-6 < abs_err < 1e-1, "a real but small precision loss"
    loose = run_gate(backend, engine, None, golden, GateSpec(atol=5e-2, rtol=5e-2))
    assert loose.passed, loose.reason


def test_element_rule_is_numpys_allclose() -> None:
    rng = np.random.default_rng(3)
    exp = rng.standard_normal((50, 7)).astype(np.float32)
    for scale in (1e-5, 1e-3, 3e-3, 1e-1):
        got = exp + (rng.standard_normal(exp.shape) * scale).astype(np.float32)
        rep = check_accuracy({"y": got}, {"y": exp}, TOL)
        assert rep.passed == bool(np.allclose(got, exp, atol=1e-3, rtol=1e-3))


def test_worst_element_is_reported_with_its_index_and_errors() -> None:
    exp = {"a": np.zeros((2, 3), np.float32), "b": np.ones((4,), np.float32)}
    got = {"a": exp["a"].copy(), "b": exp["b"].copy()}
    got["a"][1, 2] = 0.5
    got["b"][3] = 1.2
    rep = check_accuracy(got, exp, TOL)
    assert not rep.passed and rep.failed_output == "a"
    assert rep.worst == {"output": "a", "index": [1, 2], "got": 0.5, "expected": 0.0,
                         "abs_err": 0.5, "rel_err": None}  # fmt: skip
    assert rep.outputs["b"]["worst_index"] == [3] and not rep.outputs["b"]["passed"]
    assert rep.reason is not None and "also failing: 'b'" in rep.reason


def test_nan_output_shape_mismatch_and_missing_output_fail_clearly() -> None:
    exp = {"y": np.ones((2, 2), np.float32)}
    nan = {"y": np.array([[1, np.nan], [1, 1]], np.float32)}
    rep = check_accuracy(nan, exp, TOL)
    assert not rep.passed and rep.worst is not None and rep.worst["index"] == [0, 1]
    assert "nan/inf" in (rep.reason or "")
    assert "shape [2]" in (check_accuracy({"y": np.ones(2)}, exp, TOL).reason or "")
    assert "no output 'y'" in (check_accuracy({}, exp, TOL).reason or "")
    both_nan = {"y": np.array([np.nan])}
    assert check_accuracy(
        both_nan, both_nan, GateSpec(atol=0, rtol=0)
    ).passed  # NaN where golden says NaN


def test_golden_inputs_that_do_not_fit_the_model_fail_accuracy(tmp_path: Path, built) -> None:  # type: ignore[no-untyped-def]
    backend, build = built
    model = make_mlp(tmp_path / "m.onnx")
    golden = write_golden(
        tmp_path / "g.npz",
        {"input.image": np.zeros((1, 64), np.float32), "output.y": np.zeros((1, 16), np.float32)},
    )
    result = run_gate(backend, build(model, "4" * 64), None, golden, FAST)
    assert not result.passed and result.code == "accuracy"
    assert "cannot run the golden inputs" in (result.reason or "")


def test_unreadable_or_pickled_golden_is_a_bundle_error(tmp_path: Path) -> None:
    bad = tmp_path / "g.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="unreadable"):
        load_golden(bad)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, **{"input.x": np.array([{"a": 1}], dtype=object), "output.y": np.ones(1)})
    with pytest.raises(BundleError):
        load_golden(pickled)
    only_inputs = write_golden(tmp_path / "o.npz", {"input.x": np.ones(1)})
    with pytest.raises(BundleError, match="0 output"):
        load_golden(only_inputs)
