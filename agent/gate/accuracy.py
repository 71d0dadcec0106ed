"""Accuracy: every golden output, element by element, with np.allclose's rule.

An element passes when |got - expected| <= atol + rtol * |expected| (the expected value is
the golden one, as in np.allclose(got, expected)). The report names the output and the
index of the worst element, the one that exceeds its allowance by the most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class AccuracyReport:
    passed: bool
    reason: str | None = None
    failed_output: str | None = None
    worst: dict[str, Any] | None = None  # output, index, got, expected, abs_err, rel_err
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failed_output": self.failed_output,
            "worst": self.worst,
            "outputs": self.outputs,
        }


def _num(x: float) -> float | None:
    """JSON has no NaN/inf: those become None (the reason sentence still says which)."""
    return None if not math.isfinite(x) else float(x)


def check_accuracy(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray], atol: float, rtol: float
) -> AccuracyReport:
    report = AccuracyReport(passed=True)
    worst_excess = -math.inf
    for name, exp in expected.items():
        if name not in got:
            return _fail(report, name, f"the engine produced no output {name!r}")
        g = np.asarray(got[name])
        e = np.asarray(exp)
        if g.shape != e.shape:
            return _fail(
                report, name, f"output {name!r} has shape {list(g.shape)}, golden {list(e.shape)}"
            )
        g64, e64 = g.astype(np.float64), e.astype(np.float64)
        if g64.size == 0:
            report.outputs[name] = {"max_abs_err": 0.0, "max_rel_err": 0.0, "passed": True}
            continue
        diff = np.abs(g64 - e64)
        allowed = atol + rtol * np.abs(e64)
        # NaN where the golden is NaN is a match (the model is defined to give NaN there);
        # NaN or inf anywhere else is the worst possible error.
        both_nan = np.isnan(g64) & np.isnan(e64)
        same_inf = np.isinf(g64) & np.isinf(e64) & (np.sign(g64) == np.sign(e64))
        ok_special = both_nan | same_inf
        excess = np.where(ok_special, -np.inf, diff - allowed)
        excess = np.where(np.isnan(excess), np.inf, excess)
        flat = int(np.argmax(excess))
        idx = tuple(int(i) for i in np.unravel_index(flat, g.shape))
        ex = float(excess.flat[flat])
        d = float(diff.flat[flat])
        ev = float(e64.flat[flat])
        rel = d / abs(ev) if ev != 0 else (0.0 if d == 0 else math.inf)
        finite = np.where(ok_special | ~np.isfinite(diff), 0.0, diff)
        n_bad = int(np.count_nonzero(excess > 0))
        info = {
            "max_abs_err": _num(float(finite.max())),
            "worst_index": list(idx),
            "worst_abs_err": _num(d),
            "worst_rel_err": _num(rel),
            "bad_elements": n_bad,
            "elements": int(g64.size),
            "passed": n_bad == 0,
        }
        report.outputs[name] = info
        if ex > worst_excess:
            worst_excess = ex
            report.worst = {
                "output": name,
                "index": list(idx),
                "got": _num(float(g64.flat[flat])),
                "expected": _num(ev),
                "abs_err": _num(d),
                "rel_err": _num(rel),
            }
    failing = [n for n, info in report.outputs.items() if not info["passed"]]
    if failing and report.worst is not None:
        w, info = report.worst, report.outputs[report.worst["output"]]
        report.passed = False
        report.failed_output = w["output"]
        others = f" (also failing: {', '.join(repr(n) for n in failing if n != w['output'])})"
        report.reason = (
            f"output {w['output']!r} differs from the golden output at {info['bad_elements']} "
            f"of {info['elements']} elements (atol={atol:g}, rtol={rtol:g}); worst at index "
            f"{w['index']}: got {_fmt(w['got'])}, expected {_fmt(w['expected'])} (abs error "
            f"{_fmt(w['abs_err'])}, rel error {_fmt(w['rel_err'])})"
            + (others if len(failing) > 1 else "")
        )
    return report


def _fmt(x: float | None) -> str:
    return "nan/inf" if x is None else f"{x:.6g}"


def _fail(report: AccuracyReport, name: str, reason: str) -> AccuracyReport:
    report.passed = False
    report.failed_output = name
    report.reason = reason
    return report
