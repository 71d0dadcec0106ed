"""Accuracy: every golden output, compared by the check its manifest names for it.

An output without a check is compared element by element with np.allclose's rule:
|got - expected| <= atol + rtol * |expected| (the gate's atol/rtol); the report names the
index of the worst element, the one that exceeds its allowance by the most. That is right
for fp32 and wrong for reduced precision, where an engine legitimately differs element by
element and still gives the same answers; the manifest then names, per output, a metric
that fits the model (protocol.manifest.OutputCheck, Polygraphy's vocabulary):

    max | mean | median | quantile   an error statistic: abs <= atol OR rel <= rtol
    cosine                           per-sample cosine similarity (embeddings)
    topk                             agreement of the top-k classes (classifiers)
    boxes                            one-to-one IoU matching of boxes above a score (detectors)

The golden outputs are always the fp32 model's (the bundler computes or checks them), so a
quantized engine is measured against the reference, never against another approximation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol.manifest import GateSpec, OutputCheck

# Polygraphy adds this to zero golden values before dividing, so relative errors stay finite.
_REL_EPS = 2.220446049250313e-16


def _quantile_in_place(a: np.ndarray, q: float) -> float:
    """np.quantile's default (linear) rule, partitioning `a` itself: the error arrays are
    ours, and a copy of a 10 M-element output would cost as much as the partition."""
    flat = a.reshape(-1)
    pos = q * (flat.size - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    flat.partition([lo, hi] if hi != lo else lo)
    return float(flat[lo] + (flat[hi] - flat[lo]) * (pos - lo))


_STATS: dict[str, Callable[[np.ndarray, float], float]] = {
    "max": lambda a, q: float(np.max(a)),
    "mean": lambda a, q: float(np.mean(a)),
    "median": lambda a, q: _quantile_in_place(a, 0.5),
    "quantile": _quantile_in_place,
}


@dataclass
class AccuracyReport:
    passed: bool
    reason: str | None = None
    failed_output: str | None = None
    failed_metric: str | None = None
    worst: dict[str, Any] | None = None  # elementwise: output, index, got, expected, errors
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failed_output": self.failed_output,
            "failed_metric": self.failed_metric,
            "worst": self.worst,
            "outputs": self.outputs,
        }


@dataclass
class _Verdict:
    figures: dict[str, Any]
    detail: str | None = None  # why it failed, for the reason sentence
    worst: dict[str, Any] | None = None
    excess: float = -math.inf  # elementwise: by how much the worst element is over

    @property
    def passed(self) -> bool:
        return bool(self.figures["passed"])


def _num(x: float) -> float | None:
    """JSON has no NaN/inf: those become None (the reason sentence still says which)."""
    return None if not math.isfinite(x) else float(x)


def _fmt(x: float | None) -> str:
    return "nan/inf" if x is None else f"{x:.6g}"


def check_accuracy(
    got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], gate: GateSpec
) -> AccuracyReport:
    """Compare every golden output with the engine's, each by its manifest check."""
    report = AccuracyReport(passed=True)
    failing: list[tuple[str, _Verdict]] = []
    worst_excess = -math.inf
    for name, exp in expected.items():
        if name not in got:
            return _fail(report, name, f"the engine produced no output {name!r}")
        g, e = np.asarray(got[name]), np.asarray(exp)
        if g.shape != e.shape:
            return _fail(
                report, name, f"output {name!r} has shape {list(g.shape)}, golden {list(e.shape)}"
            )
        check = gate.outputs.get(name, OutputCheck())
        try:
            verdict = _judge(name, g, e, check, gate, got, expected)
        except _Unfit as err:
            return _fail(report, name, f"output {name!r}: {err}", check.metric)
        report.outputs[name] = verdict.figures
        if verdict.worst is not None and verdict.excess > worst_excess:
            report.worst, worst_excess = verdict.worst, verdict.excess
        if not verdict.passed:
            failing.append((name, verdict))
    if failing:
        _explain(report, failing, gate)
    return report


def _explain(report: AccuracyReport, failing: list[tuple[str, _Verdict]], gate: GateSpec) -> None:
    # Elementwise failures are ranked by their worst element (the old rule); otherwise the
    # first failing output in golden order leads the sentence.
    lead = next((n for n, _ in failing if report.worst and report.worst["output"] == n), None)
    name, verdict = next(((n, v) for n, v in failing if n == lead), failing[0])
    report.passed = False
    report.failed_output = name
    report.failed_metric = verdict.figures["metric"]
    others = [repr(n) for n, _ in failing if n != name]
    report.reason = (verdict.detail or f"output {name!r} fails") + (
        f" (also failing: {', '.join(others)})" if others else ""
    )


class _Unfit(Exception):
    """The output cannot be judged by its check at all (wrong rank, missing scores)."""


def _judge(
    name: str,
    g: np.ndarray,
    e: np.ndarray,
    check: OutputCheck,
    gate: GateSpec,
    got: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
) -> _Verdict:
    atol = gate.atol if check.atol is None else check.atol
    rtol = gate.rtol if check.rtol is None else check.rtol
    g64, e64 = g.astype(np.float64, copy=False), e.astype(np.float64, copy=False)
    if check.metric == "elementwise":
        return _elementwise(name, g64, e64, atol, rtol)
    if g64.size == 0:
        return _Verdict({"metric": check.metric, "passed": True, "elements": 0})
    bad = _new_nonfinite(g64, e64)
    if bad:
        return _Verdict(
            {"metric": check.metric, "passed": False, "nonfinite": bad},
            f"output {name!r} fails its {check.metric} check: {bad} NaN/inf value(s) where "
            "the golden output is finite",
        )
    if check.metric in _STATS:
        return _error_stat(name, g64, e64, check, atol, rtol)
    if check.metric == "cosine":
        return _cosine(name, g64, e64, check)
    if check.metric == "topk":
        return _topk(name, g64, e64, check)
    return _boxes(name, g64, e64, check, got, expected)


def _special_match(g: np.ndarray, e: np.ndarray) -> np.ndarray:
    # NaN where the golden is NaN is a match (the model is defined to give NaN there), and
    # so is the same infinity.
    both_nan = np.isnan(g) & np.isnan(e)
    same_inf = np.isinf(g) & np.isinf(e) & (np.sign(g) == np.sign(e))
    return both_nan | same_inf


def _new_nonfinite(g: np.ndarray, e: np.ndarray) -> int:
    if np.isfinite(g).all():
        return 0
    return int(np.count_nonzero(~np.isfinite(g) & ~_special_match(g, e)))


def _abs_diff(g64: np.ndarray, e64: np.ndarray) -> np.ndarray:
    diff = np.subtract(g64, e64)
    return np.abs(diff, out=diff)


def _elementwise(name: str, g64: np.ndarray, e64: np.ndarray, atol: float, rtol: float) -> _Verdict:
    if g64.size == 0:
        return _Verdict({"metric": "elementwise", "max_abs_err": 0.0, "max_rel_err": 0.0,
                         "passed": True})  # fmt: skip
    diff = _abs_diff(g64, e64)
    allowed = np.abs(e64)
    allowed *= rtol
    allowed += atol
    excess = np.subtract(diff, allowed, out=allowed)
    ok_special: np.ndarray | None = None
    if not np.isfinite(excess).all():  # rare: only then pay for the NaN/inf bookkeeping
        ok_special = _special_match(g64, e64)
        # NaN or inf anywhere the golden output does not have it is the worst possible error.
        excess = np.where(ok_special, -np.inf, excess)
        excess[np.isnan(excess)] = np.inf
    flat = int(np.argmax(excess))
    idx = [int(i) for i in np.unravel_index(flat, g64.shape)]
    d, ev = float(diff.flat[flat]), float(e64.flat[flat])
    rel = d / abs(ev) if ev != 0 else (0.0 if d == 0 else math.inf)
    if ok_special is None:
        max_abs = float(diff.max())
    else:
        max_abs = float(np.where(ok_special | ~np.isfinite(diff), 0.0, diff).max())
    n_bad = int(np.count_nonzero(excess > 0))
    got_v, exp_v, abs_v, rel_v = _num(float(g64.flat[flat])), _num(ev), _num(d), _num(rel)
    worst = {"output": name, "index": idx, "got": got_v, "expected": exp_v, "abs_err": abs_v,
             "rel_err": rel_v}  # fmt: skip
    figures = {
        "metric": "elementwise",
        "atol": atol,
        "rtol": rtol,
        "max_abs_err": _num(max_abs),
        "worst_index": idx,
        "worst_abs_err": _num(d),
        "worst_rel_err": _num(rel),
        "bad_elements": n_bad,
        "elements": int(g64.size),
        "passed": n_bad == 0,
    }
    detail = (
        f"output {name!r} differs from the golden output at {n_bad} of {g64.size} elements "
        f"(atol={atol:g}, rtol={rtol:g}); worst at index {idx}: got {_fmt(got_v)}, expected "
        f"{_fmt(exp_v)} (abs error {_fmt(abs_v)}, rel error {_fmt(rel_v)})"
    )
    return _Verdict(figures, detail, worst, float(excess.flat[flat]))


def _error_stat(
    name: str, g64: np.ndarray, e64: np.ndarray, check: OutputCheck, atol: float, rtol: float
) -> _Verdict:
    """Polygraphy's check_error_stat: the statistic of |err| <= atol OR of |err|/|golden|
    <= rtol."""
    absdiff = _abs_diff(g64, e64)
    if not np.isfinite(absdiff).all():  # only matching NaN/inf are left (checked before)
        absdiff[_special_match(g64, e64)] = 0.0
    ref = np.abs(e64)
    ref[ref == 0] = _REL_EPS
    reldiff = np.divide(absdiff, ref, out=ref)
    stat = _STATS[check.metric]
    q = check.error_quantile
    max_abs = float(absdiff.max())  # before the statistic reorders the array
    abs_s, rel_s = stat(absdiff, q), stat(reldiff, q)
    passed = abs_s <= atol or rel_s <= rtol
    what = f"the {q:g} quantile" if check.metric == "quantile" else f"the {check.metric}"
    figures = {
        "metric": check.metric,
        "abs_err": _num(abs_s),
        "rel_err": _num(rel_s),
        "atol": atol,
        "rtol": rtol,
        "max_abs_err": _num(max_abs),
        "elements": int(g64.size),
        "passed": passed,
    }
    if check.metric == "quantile":
        figures["error_quantile"] = q
    detail = (
        f"output {name!r} fails its {check.metric} check: {what} of the absolute error is "
        f"{abs_s:.4g} > atol {atol:g} and of the relative error {rel_s:.4g} > rtol {rtol:g} "
        f"(max absolute error {max_abs:.4g})"
    )
    return _Verdict(figures, None if passed else detail)


def _samples(a: np.ndarray) -> np.ndarray:
    """Rows are samples: axis 0 is the batch for rank >= 2; a vector is one sample."""
    return a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)


def _cosine(name: str, g64: np.ndarray, e64: np.ndarray, check: OutputCheck) -> _Verdict:
    g2, e2 = _samples(g64), _samples(e64)
    ng, ne = np.linalg.norm(g2, axis=1), np.linalg.norm(e2, axis=1)
    dot = np.einsum("ij,ij->i", g2, e2)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (ng * ne)
    # Two zero vectors agree; a zero vector against anything else has no direction in common.
    cos = np.where((ng == 0) & (ne == 0), 1.0, np.where((ng == 0) | (ne == 0), 0.0, cos))
    worst = int(np.argmin(cos))
    low = float(cos[worst])
    passed = low >= check.min_cosine
    figures = {
        "metric": "cosine",
        "min_cosine": _num(low),
        "mean_cosine": _num(float(cos.mean())),
        "worst_sample": worst,
        "samples": int(cos.size),
        "threshold": check.min_cosine,
        "passed": passed,
    }
    detail = (
        f"output {name!r} fails its cosine check: cosine similarity {low:.6f} at sample "
        f"{worst} is under {check.min_cosine:g} (mean {float(cos.mean()):.6f} over "
        f"{cos.size} samples)"
    )
    return _Verdict(figures, None if passed else detail)


def _topk_rows(a: np.ndarray, axis: int) -> np.ndarray:
    if a.ndim == 0:
        raise _Unfit("a topk check needs an output with a class axis, this one is a scalar")
    try:
        moved = np.moveaxis(a, axis, -1)
    except (ValueError, IndexError) as err:  # numpy's AxisError is both
        raise _Unfit(f"topk axis {axis} does not exist in shape {list(a.shape)}") from err
    return moved.reshape(-1, moved.shape[-1])


def _top(rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest indices, largest first (a partition, then a sort of k)."""
    idx = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(rows, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def _topk(name: str, g64: np.ndarray, e64: np.ndarray, check: OutputCheck) -> _Verdict:
    g2, e2 = _topk_rows(g64, check.axis), _topk_rows(e64, check.axis)
    k = min(check.k, e2.shape[1])
    top_g, top_e = _top(g2, k), _top(e2, k)
    shared = (top_e[:, :, None] == top_g[:, None, :]).any(axis=2).sum(axis=1) / k
    agreement = float(shared.mean())
    differing = np.flatnonzero(shared < 1.0)
    passed = agreement >= check.min_agreement
    figures: dict[str, Any] = {
        "metric": "topk",
        "k": k,
        "agreement": agreement,
        "rows": int(shared.size),
        "rows_differing": int(differing.size),
        "threshold": check.min_agreement,
        "passed": passed,
    }
    detail = None
    if differing.size:
        row = int(differing[0])
        figures["first_differing"] = {"row": row, "got": top_g[row].tolist(),
                                      "expected": top_e[row].tolist()}  # fmt: skip
    if not passed:
        row = int(differing[0])
        detail = (
            f"output {name!r} fails its topk check: top-{k} agreement {agreement:.4f} is under "
            f"{check.min_agreement:g} ({differing.size} of {shared.size} rows differ; row "
            f"{row}: got {top_g[row].tolist()}, expected {top_e[row].tolist()})"
        )
    return _Verdict(figures, detail)


def _xyxy(b: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "xyxy":
        return b
    x, y, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    if fmt == "xywh":
        return np.stack([x, y, x + w, y + h], axis=-1)
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=-1)


_IOU_ROWS = 256  # golden boxes per IoU block: memory stays at 256 x N engine boxes


def _area(b: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a [R, 4] and b [C, 4] (coordinate by coordinate: a
    reduction over a trailing axis of 2 would cost several times more)."""
    w = np.minimum(a[:, 2:3], b[:, 2]) - np.maximum(a[:, 0:1], b[:, 0])
    h = np.minimum(a[:, 3:4], b[:, 3]) - np.maximum(a[:, 1:2], b[:, 1])
    np.clip(w, 0, None, out=w)
    np.clip(h, 0, None, out=h)
    inter = np.multiply(w, h, out=w)
    union = np.add(_area(a)[:, None], _area(b)[None, :], out=h)
    union -= inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _overlapping_pairs(
    ref: np.ndarray, cand: np.ndarray, iou_min: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(golden index, engine index, IoU) of every pair with IoU >= iou_min (> 0, so the
    boxes overlap): golden boxes in blocks along x, each against only the engine boxes
    whose x-range meets the block's, so a raw detection head stays cheap."""
    by_x1 = np.argsort(cand[:, 0], kind="stable")
    cand_x1 = cand[by_x1, 0]
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    ref_order = np.argsort(ref[:, 0], kind="stable")
    for start in range(0, ref.shape[0], _IOU_ROWS):
        rows = ref_order[start : start + _IOU_ROWS]
        block = ref[rows]
        reach = int(np.searchsorted(cand_x1, block[:, 2].max(), side="left"))
        near = by_x1[:reach][cand[by_x1[:reach], 2] > block[:, 0].min()]
        iou = _iou(block, cand[near])
        r, c = np.nonzero(iou >= iou_min)
        found.append((rows[r], near[c], iou[r, c]))
    if not found:
        return np.empty(0, int), np.empty(0, int), np.empty(0)
    ri, ci, vi = (np.concatenate(parts) for parts in zip(*found, strict=True))
    return ri, ci, vi


def _match(ref: np.ndarray, ref_s: np.ndarray, cand: np.ndarray, iou_min: float) -> int:
    """Greedy one-to-one matching: golden boxes in score order, each takes the free engine
    box it overlaps most, if by >= iou_min. How many golden boxes find a partner."""
    if ref.shape[0] == 0 or cand.shape[0] == 0:
        return 0
    ri, ci, vi = _overlapping_pairs(ref, cand, iou_min)
    order = np.lexsort((ci, ri))  # by golden box, then engine index (ties: the lowest)
    ri, ci, vi = ri[order], ci[order], vi[order]
    bounds = np.searchsorted(ri, np.arange(ref.shape[0] + 1))
    free = np.ones(cand.shape[0], bool)
    matched = 0
    for i in np.argsort(-ref_s, kind="stable"):
        lo, hi = bounds[i], bounds[i + 1]
        if lo == hi:
            continue
        options = free[ci[lo:hi]]
        if options.any():
            free[ci[lo:hi][int(np.argmax(np.where(options, vi[lo:hi], -1.0)))]] = False
            matched += 1
    return matched


def _boxes(
    name: str,
    g64: np.ndarray,
    e64: np.ndarray,
    check: OutputCheck,
    got: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
) -> _Verdict:
    score_name = check.scores or ""
    if score_name not in got or score_name not in expected:
        raise _Unfit(f"the boxes check needs scores output {score_name!r}, which is missing")
    gs = np.asarray(got[score_name], np.float64)
    es = np.asarray(expected[score_name], np.float64)
    if g64.ndim < 2 or g64.shape[-1] != 4 or es.shape != g64.shape[:-1] or gs.shape != es.shape:
        raise _Unfit(
            f"boxes {list(g64.shape)} and scores {list(es.shape)} must be [..., N, 4] and [..., N]"
        )
    gb = _xyxy(g64, check.box_format).reshape(-1, g64.shape[-2], 4)
    eb = _xyxy(e64, check.box_format).reshape(-1, g64.shape[-2], 4)
    gs, es = gs.reshape(gb.shape[:2]), es.reshape(eb.shape[:2])
    thr = check.score_threshold
    n_ref = n_cand = matched = 0
    for i in range(eb.shape[0]):
        keep_e, keep_g = es[i] >= thr, gs[i] >= thr
        n_ref += int(keep_e.sum())
        n_cand += int(keep_g.sum())
        matched += _match(eb[i][keep_e], es[i][keep_e], gb[i][keep_g], check.iou)
    recall = matched / n_ref if n_ref else 1.0
    precision = matched / n_cand if n_cand else 1.0
    agreement = min(recall, precision)
    passed = agreement >= check.min_agreement
    figures = {
        "metric": "boxes",
        "golden_boxes": n_ref,
        "engine_boxes": n_cand,
        "matched": matched,
        "recall": recall,
        "precision": precision,
        "score_threshold": thr,
        "iou": check.iou,
        "threshold": check.min_agreement,
        "passed": passed,
    }
    detail = (
        f"output {name!r} fails its boxes check: of {n_ref} golden and {n_cand} engine boxes "
        f"scoring >= {thr:g}, {matched} match with IoU >= {check.iou:g} (recall {recall:.3f}, "
        f"precision {precision:.3f}, under {check.min_agreement:g})"
    )
    return _Verdict(figures, None if passed else detail)


def _fail(
    report: AccuracyReport, name: str, reason: str, metric: str | None = None
) -> AccuracyReport:
    report.passed = False
    report.failed_output = name
    report.failed_metric = metric
    report.reason = reason
    return report
