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
from agent.gate.golden import check_golden, load_golden
from protocol.errors import BundleError
from protocol.manifest import BuildOptions, GateSpec, TensorSpec
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


X = TensorSpec(name="x", dtype="float32", shape=["batch", 64])
Y = TensorSpec(name="y", dtype="float32", shape=["batch", 16])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"input.x": np.zeros((2, 64), np.float64)}, "'input.x' is float64, the manifest says"),
        ({"input.x": np.zeros((2, 63), np.float32)}, "'input.x' has shape [2, 63], the manif"),
        ({"input.x": np.zeros((2, 64, 1), np.float32)}, "'input.x' has shape [2, 64, 1]"),
        ({"input.x": np.zeros((2, 64), np.float32), "extra": np.zeros(1)}, "array 'extra'"),
        ({"output.y": np.zeros((2, 16), np.float32)}, "lacks 'input.x'"),
        ({"input.x": np.zeros((2, 64), np.float32), "output.y": None}, "lacks any output"),
        ({"input.x": np.zeros((5000, 64), np.float32)}, "1 MiB decoded, above this device's"),
    ],
)
def test_golden_headers_are_checked_against_the_manifest(
    tmp_path: Path, arrays: dict[str, np.ndarray | None], message: str
) -> None:
    golden = {"output.y": np.zeros((2, 16), np.float32), **arrays}
    path = write_golden(tmp_path / "g.npz", {k: v for k, v in golden.items() if v is not None})
    with pytest.raises(BundleError) as e:
        check_golden(path, [X], [Y], max_bytes=2**20)
    assert message in e.value.reason and "\n" not in e.value.reason


def test_golden_headers_of_a_good_file_pass(tmp_path: Path) -> None:
    path = write_golden(
        tmp_path / "g.npz",
        {"input.x": np.zeros((3, 64), np.float32), "output.y": np.zeros((3, 16), np.float32)},
    )
    check_golden(path, [X], [Y], max_bytes=2**20)


# -- the metrics a manifest can name per output --------------------------------------------


def _gate(**check: object) -> GateSpec:
    return GateSpec.model_validate({"outputs": {"y": check}})


@pytest.mark.parametrize("stat", ["max", "mean", "median", "quantile"])
def test_error_statistics_give_polygraphys_verdict(stat: str) -> None:
    pg = pytest.importorskip("polygraphy.comparator", reason="polygraphy is a dev dependency")
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    rng = np.random.default_rng(11)
    exp = rng.standard_normal((8, 200)).astype(np.float32)
    exp[0, :5] = 0.0  # zeros: Polygraphy's epsilon for the relative error
    for scale, tail in ((1e-3, 0.0), (1e-2, 0.0), (3e-3, 0.5), (5e-2, 2.0)):
        got = exp + (rng.standard_normal(exp.shape) * scale).astype(np.float32)
        got.flat[rng.choice(exp.size, 12, replace=False)] += np.float32(tail)  # a tail
        for tol in (2e-3, 1e-2, 5e-2):
            gate = _gate(metric=stat, atol=tol, rtol=tol, error_quantile=0.95)
            ours = check_accuracy({"y": got}, {"y": exp}, gate)
            compare = pg.SimpleCompareFunc(atol=tol, rtol=tol, check_error_stat=stat,
                                           error_quantile=0.95)  # fmt: skip
            theirs = compare(pg.IterationResult({"y": got}, runner_name="engine"),
                             pg.IterationResult({"y": exp}, runner_name="golden"))  # fmt: skip
            assert ours.passed == bool(theirs["y"]), (stat, scale, tail, tol)
            figures = ours.outputs["y"]
            pg_abs = getattr(theirs["y"], f"{stat}_absdiff")
            assert figures["abs_err"] == pytest.approx(float(pg_abs), rel=1e-6)


def test_quantile_ignores_a_tail_that_the_maximum_sees() -> None:
    exp = np.linspace(-1, 1, 1000, dtype=np.float32)
    got = exp + np.float32(1e-3)
    got[:5] += np.float32(0.5)  # 0.5% of the elements: below the 99th percentile
    assert check_accuracy({"y": got}, {"y": exp}, _gate(metric="quantile", atol=2e-3)).passed
    rep = check_accuracy({"y": got}, {"y": exp}, _gate(metric="max", atol=2e-3, rtol=0))
    assert not rep.passed and rep.failed_metric == "max"
    assert rep.reason is not None and "fails its max check" in rep.reason
    assert "absolute error is 0.501 > atol 0.002" in rep.reason


def test_cosine_judges_each_sample_and_names_the_worst() -> None:
    rng = np.random.default_rng(5)
    exp = rng.standard_normal((4, 128))
    scaled = exp * 1.7  # same direction, other length: an embedding that still matches
    assert check_accuracy({"y": scaled}, {"y": exp}, _gate(metric="cosine")).passed
    turned = exp.copy()
    turned[2] = rng.standard_normal(128)  # one sample points elsewhere
    rep = check_accuracy({"y": turned}, {"y": exp}, _gate(metric="cosine", min_cosine=0.95))
    assert not rep.passed and rep.failed_metric == "cosine"
    assert rep.outputs["y"]["worst_sample"] == 2 and rep.outputs["y"]["min_cosine"] < 0.5
    assert "at sample 2 is under 0.95" in (rep.reason or "")
    zeros = {"y": np.zeros((2, 3))}
    assert check_accuracy(zeros, zeros, _gate(metric="cosine")).passed


def test_topk_counts_shared_classes_per_row() -> None:
    exp = np.array([[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.3, 0.1], [0.0, 0.1, 0.2, 0.7]])
    got = exp.copy()
    got[1] = [0.3, 0.1, 0.5, 0.1]  # row 1: top-1 flips from class 0 to 2, top-2 is {0, 2}
    top1 = check_accuracy({"y": got}, {"y": exp}, _gate(metric="topk", min_agreement=0.6))
    assert top1.passed and top1.outputs["y"]["agreement"] == pytest.approx(2 / 3)
    assert top1.outputs["y"]["first_differing"] == {"row": 1, "got": [2], "expected": [0]}
    top2 = check_accuracy({"y": got}, {"y": exp}, _gate(metric="topk", k=2, min_agreement=1))
    assert top2.passed, top2.reason
    strict = check_accuracy({"y": got}, {"y": exp}, _gate(metric="topk", min_agreement=1))
    assert not strict.passed and "1 of 3 rows differ; row 1: got [2], expected [0]" in (
        strict.reason or ""
    )
    # The class axis need not be last: [classes, batch] with axis 0.
    assert check_accuracy({"y": got.T}, {"y": exp.T}, _gate(metric="topk", axis=0,
                                                          min_agreement=0.6)).passed  # fmt: skip
    bad_axis = check_accuracy({"y": got}, {"y": exp}, _gate(metric="topk", axis=5))
    assert not bad_axis.passed and "topk axis 5 does not exist" in (bad_axis.reason or "")


def test_nan_in_a_reduced_precision_output_fails_every_metric() -> None:
    exp = np.ones((2, 4))
    got = exp.copy()
    got[1, 3] = np.nan  # fp16 overflow, say: NaN must not hide in a quantile or a top-k
    for metric in ("quantile", "cosine", "topk"):
        rep = check_accuracy({"y": got}, {"y": exp}, _gate(metric=metric, min_agreement=0.5))
        assert not rep.passed and "1 NaN/inf value(s)" in (rep.reason or ""), metric
        json.dumps(rep.figures(), allow_nan=False)  # the figures travel in a JSON event


def _detections(boxes: list[list[float]], scores: list[float]) -> dict[str, np.ndarray]:
    return {"boxes": np.array([boxes], np.float32), "scores": np.array([scores], np.float32)}


BOXES = GateSpec.model_validate(
    {"outputs": {"boxes": {"metric": "boxes", "scores": "scores", "score_threshold": 0.5,
                           "iou": 0.5, "min_agreement": 1.0},
                 "scores": {"metric": "max", "atol": 0.2}}}
)  # fmt: skip


def test_boxes_above_the_score_must_match_one_to_one() -> None:
    golden = _detections([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [0.9, 0.8, 0.1])
    # Every box moved a little, scores changed, the low-score box moved far: still the same
    # detections above 0.5.
    shifted = _detections([[1, 0, 11, 10], [21, 19, 41, 39], [0, 0, 5, 5]], [0.85, 0.75, 0.2])
    ok = check_accuracy(shifted, golden, BOXES)
    assert ok.passed, ok.reason
    figures = ok.outputs["boxes"]
    assert (figures["golden_boxes"], figures["engine_boxes"], figures["matched"]) == (2, 2, 2)
    # One object lost below the threshold, one ghost box above it.
    lost = _detections([[0, 0, 10, 10], [20, 20, 40, 40], [70, 70, 90, 90]], [0.9, 0.4, 0.6])
    rep = check_accuracy(lost, golden, BOXES)
    assert not rep.passed and rep.failed_output == "boxes" and rep.failed_metric == "boxes"
    assert rep.outputs["boxes"]["recall"] == 0.5 and rep.outputs["boxes"]["precision"] == 0.5
    assert "of 2 golden and 2 engine boxes scoring >= 0.5, 1 match with IoU >= 0.5" in (
        rep.reason or ""
    )
    json.dumps(rep.figures(), allow_nan=False)


def test_boxes_in_centre_format_and_a_malformed_head_are_judged_clearly() -> None:
    spec = BOXES.model_copy(deep=True)
    spec.outputs["boxes"].box_format = "cxcywh"
    golden = _detections([[5, 5, 10, 10]], [0.9])
    moved = _detections([[30, 30, 10, 10]], [0.9])  # same size, elsewhere: IoU 0
    assert check_accuracy(golden, golden, spec).passed
    assert not check_accuracy(moved, golden, spec).passed
    flat = {"boxes": np.zeros((1, 3), np.float32), "scores": np.zeros((1, 3), np.float32)}
    rep = check_accuracy(flat, flat, BOXES)
    assert not rep.passed and "must be [..., N, 4] and [..., N]" in (rep.reason or "")


def _greedy_matches(ref, ref_s, cand, iou_min):  # type: ignore[no-untyped-def]
    """The plain greedy rule, one golden box at a time against every engine box: what the
    blocked, sparse matcher must equal."""
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    free, matched = np.ones(len(cand), bool), 0
    for i in np.argsort(-ref_s, kind="stable"):
        w = np.clip(np.minimum(ref[i, 2], cand[:, 2]) - np.maximum(ref[i, 0], cand[:, 0]), 0, None)
        h = np.clip(np.minimum(ref[i, 3], cand[:, 3]) - np.maximum(ref[i, 1], cand[:, 1]), 0, None)
        iou = np.where(free, w * h / (area(ref[i]) + area(cand) - w * h), -1.0)
        if iou.max() >= iou_min:
            free[int(np.argmax(iou))] = False
            matched += 1
    return matched


def test_box_matching_in_blocks_equals_plain_greedy_matching() -> None:
    rng = np.random.default_rng(9)
    n = 300  # more golden boxes than one IoU block
    xy = rng.random((1, n, 2)) * 300
    boxes = np.concatenate([xy, xy + rng.random((1, n, 2)) * 40 + 2], axis=2)
    moved = boxes + rng.standard_normal(boxes.shape) * 3
    scores = rng.random((1, n))
    golden, engine = {"boxes": boxes, "scores": scores}, {"boxes": moved, "scores": scores}
    for iou_min in (0.3, 0.7):
        check = {"metric": "boxes", "scores": "scores", "score_threshold": 0.0, "iou": iou_min}
        spec = GateSpec.model_validate({"outputs": {"boxes": check}})
        rep = check_accuracy(engine, golden, spec)
        expected = _greedy_matches(boxes[0], scores[0], moved[0], iou_min)
        assert rep.outputs["boxes"]["matched"] == expected and 0 < expected < n
