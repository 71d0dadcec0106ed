"""Speed: warm-up, then candidate and active interleaved on the same input, then a verdict.

Pairs alternate their order (A B, B A, …) so that neither engine always runs second with
warm caches. After every batch of pairs the median paired log ratio gets a confidence
interval (agent.gate.stats); the run stops as soon as the interval lies wholly above the
allowed slowdown (a regression, proven) or wholly below it (no regression), or when the
time budget is spent, in which case a regression not proven is not a regression. The
absolute budget (p99, throughput) is judged on the candidate's own samples.

With a `ConditionsWatch` (a Jetson), the power mode, clocks, temperatures and throttling
are read before the warm-up and after every batch; when any of them moved, the run stops
and the report says `not_judged` with what moved: the samples no longer compare like
with like, and the gate must not charge the model with the machine's drift.

Like trtexec, the report warns when the coefficient of variation of the candidate's
latency exceeds 1% (unpinned clocks, a busy machine): the verdict still stands, since
the paired test absorbs common noise, but the absolute figures are less trustworthy.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.engines.api import Engine
from agent.gate.stats import DEFAULT_Z, median_interval, percentiles_ms, ratio_pct
from agent.telemetry.conditions import ConditionsWatch

CV_WARN_PCT = 1.0  # trtexec's threshold for "GPU compute time is unstable"


@dataclass(frozen=True)
class SpeedSettings:
    time_budget_s: float = 8.0  # measuring phase; warm-up comes on top (≤ 10% of this)
    min_pairs: int = 30
    max_pairs: int = 400  # then decide: the median's CI is ~±1.5% by now on a noisy CPU
    batch_pairs: int = 20  # look at the interval after this many new pairs
    warmup_s: float = 0.3
    warmup_min_runs: int = 5
    # Verdict rule: a regression is a slowdown that is statistically real (the median
    # log ratio's lower bound at z_regression, two-sided 95%, is above 0) AND larger than
    # the allowance (the median itself is above max_regression_pct). The run stops early
    # when the lower bound already clears the allowance (regression beyond doubt) or the
    # upper bound is under it at the stricter z_no_regression (an early pass is the error
    # that would let a slow engine through, so it needs more certainty).
    z_regression: float = 1.96
    z_no_regression: float = DEFAULT_Z
    solo_samples: int = 400  # with no active engine: enough for a p99 (4 above it)
    hard_cap_factor: float = 6.0  # a very slow model may overrun the budget to reach min_pairs
    # Not judged (clocks/thermal moved): measure again after a pause, at most this many
    # runs in all; then the gate reports not_judged instead of a verdict.
    attempts: int = 3
    retry_wait_s: float = 30.0  # time for a clock change or a heat soak to settle
    max_temp_rise_c: float = 10.0  # a larger rise in any zone during a run is a change


@dataclass
class SpeedReport:
    candidate: dict[str, Any]
    active: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    regression: bool = False
    candidate_samples_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    active_samples_s: np.ndarray | None = None
    not_judged: list[str] = field(default_factory=list)  # what moved; [] = judged
    conditions: dict[str, Any] | None = None  # before/after snapshots (Jetson only)
    warnings: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"candidate": self.candidate}
        if self.active is not None:
            out["active"] = self.active
        if self.comparison is not None:
            out["comparison"] = self.comparison
        if self.not_judged:
            out["not_judged"] = self.not_judged
        if self.conditions is not None:
            out["conditions"] = self.conditions
        if self.warnings:
            out["warnings"] = self.warnings
        return out


def _time_one(engine: Engine, feeds: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    engine.infer(feeds)
    return time.perf_counter() - t0


def _warm_up(engines: list[Engine], feeds: dict[str, np.ndarray], s: SpeedSettings) -> None:
    deadline = time.perf_counter() + s.warmup_s
    runs = 0
    while runs < s.warmup_min_runs or (time.perf_counter() < deadline and runs < 1000):
        for e in engines:
            e.infer(feeds)
        runs += 1


def _summary(samples: np.ndarray, engine: Engine) -> dict[str, Any]:
    out: dict[str, Any] = dict(percentiles_ms(samples))
    out["samples"] = int(samples.size)
    mean = float(samples.mean()) if samples.size else math.nan
    # Single-stream throughput of the golden batch, in inferences per second.
    out["throughput_ips"] = round(1.0 / mean, 3) if mean > 0 else None
    out["device_memory_bytes"] = int(engine.device_memory_bytes())
    out["cv_pct"] = round(float(samples.std() / mean * 100), 3) if mean > 0 else None
    return out


def _cv_warning(who: str, summary: dict[str, Any]) -> list[str]:
    cv = summary.get("cv_pct")
    if cv is None or cv <= CV_WARN_PCT:
        return []
    return [
        f"{who} latency varies by {cv:.1f}% (coefficient of variation, over "
        f"{CV_WARN_PCT:g}%): pin the clocks (jetson_clocks) for stable absolute figures"
    ]


def measure(
    candidate: Engine,
    active: Engine | None,
    feeds: dict[str, np.ndarray],
    max_regression_pct: float,
    settings: SpeedSettings | None = None,
    watch: ConditionsWatch | None = None,
) -> SpeedReport:
    s = settings or SpeedSettings()
    threshold = math.log1p(max_regression_pct / 100.0)
    engines = [candidate] if active is None else [candidate, active]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collector pause inside one timed call would be charged to that engine
    moved: list[str] = []
    try:
        if watch is not None:
            watch.start()
        _warm_up(engines, feeds, s)
        cand: list[float] = []
        act: list[float] = []
        started = time.perf_counter()
        while True:
            _sample_pairs(candidate, active, feeds, s, cand, act)
            elapsed = time.perf_counter() - started
            if watch is not None and (moved := watch.check()):
                stop_reason = "conditions_changed"
                break
            stop = _stop_reason(s, active is not None, cand, act, threshold, elapsed)
            if stop is not None:
                stop_reason = stop
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    cand_arr = np.asarray(cand)
    report = SpeedReport(candidate=_summary(cand_arr, candidate), candidate_samples_s=cand_arr)
    report.candidate["measure_s"] = round(elapsed, 3)
    report.candidate["stop"] = stop_reason
    report.warnings = _cv_warning("the candidate's", report.candidate)
    if watch is not None:
        report.conditions = watch.figures()
    if moved:
        report.not_judged = moved
        return report  # no verdict from samples taken across a change
    if active is None:
        return report
    act_arr = np.asarray(act)
    report.active = _summary(act_arr, active)
    report.active_samples_s = act_arr
    _compare(report, cand_arr, act_arr, s, threshold, max_regression_pct, stop_reason)
    return report


def _sample_pairs(
    candidate: Engine,
    active: Engine | None,
    feeds: dict[str, np.ndarray],
    s: SpeedSettings,
    cand: list[float],
    act: list[float],
) -> None:
    """One batch of timed calls, candidate and active alternating which goes first."""
    for _ in range(s.batch_pairs):
        if active is None:
            cand.append(_time_one(candidate, feeds))
        elif len(cand) % 2 == 0:
            cand.append(_time_one(candidate, feeds))
            act.append(_time_one(active, feeds))
        else:
            act.append(_time_one(active, feeds))
            cand.append(_time_one(candidate, feeds))


def _stop_reason(
    s: SpeedSettings,
    paired: bool,
    cand: list[float],
    act: list[float],
    threshold: float,
    elapsed: float,
) -> str | None:
    """Why sampling stops now, or None to take another batch."""
    n = len(cand)
    if paired and n >= s.min_pairs:
        r = np.log(np.asarray(cand)) - np.log(np.asarray(act))
        if median_interval(r, s.z_regression).low > threshold:
            return "regression_proven"
        if median_interval(r, s.z_no_regression).high <= threshold:
            return "no_regression_proven"
    if n >= s.max_pairs:
        return "max_pairs"
    if elapsed >= s.time_budget_s and (
        n >= s.min_pairs or elapsed >= s.time_budget_s * s.hard_cap_factor
    ):
        return "time_budget"
    if (
        not paired
        and n >= s.min_pairs
        and (n >= s.solo_samples or elapsed >= min(s.time_budget_s, 1.0))
    ):
        # Alone, the candidate only needs enough samples for a stable p99.
        return "samples_enough"
    return None


def _compare(
    report: SpeedReport,
    cand_arr: np.ndarray,
    act_arr: np.ndarray,
    s: SpeedSettings,
    threshold: float,
    max_regression_pct: float,
    stop_reason: str,
) -> None:
    """The paired verdict: regression or not, with its interval, into the report."""
    ratios = np.log(cand_arr) - np.log(act_arr)
    interval = median_interval(ratios, s.z_regression)
    strict = median_interval(ratios, s.z_no_regression)
    report.regression = interval.median > threshold and interval.low > 0
    if interval.low > threshold:
        verdict = "regression"
    elif report.regression:
        verdict = "regression_by_median"
    elif strict.high <= threshold:
        verdict = "no_regression"
    else:
        verdict = "within_allowance" if interval.median <= threshold else "not_significant"
    report.comparison = {
        "pairs": interval.n,
        "method": "median of paired log ratios, sign-test (order statistic) interval; "
        "regression = median above the allowance and lower bound above 0",
        "confidence": round(math.erf(s.z_regression / math.sqrt(2)), 4),
        "median_change_pct": round(ratio_pct(interval.median), 3),
        "ci_change_pct": [
            _finite(round(ratio_pct(interval.low), 3)),
            _finite(round(ratio_pct(interval.high), 3)),
        ],
        "max_regression_pct": max_regression_pct,
        "verdict": verdict,
        "stop": stop_reason,
    }  # fmt: skip


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
