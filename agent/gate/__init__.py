"""The gate: may this candidate engine replace the active one? Accuracy, then speed.

    run_gate(backend, candidate, active, golden, spec) -> GateResult

Accuracy runs the golden inputs through the candidate and compares every golden output by
the check the manifest names for it (agent.gate.accuracy: elementwise atol/rtol unless an
error statistic, cosine, top-k or box agreement is named). Speed times the candidate
against the active engine, interleaved, and decides a regression with a paired test
(agent.gate.speed); with no active engine only the manifest's absolute budget applies.
`figures` is JSON-able and goes into the job event's `gate` field; `figures["p99_ms"]` is
the candidate's gate p99 that probation compares live latencies with.

On a Jetson (a `ConditionsWatch` given) the speed run records the power mode, clocks,
temperatures and throttling before and after; when any of them moved during a run, that
run is *not judged*: `on_not_judged` hears why, the gate waits `retry_wait_s` and measures
again, at most `attempts` runs in all. When every run moved, the result is
`code="not_judged"`: no verdict on the model either way (the worker leaves the active
engine in place and says the device, not the model, was the problem).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.engines.api import Backend, Engine, EngineError
from agent.gate.accuracy import AccuracyReport, check_accuracy
from agent.gate.golden import load_golden
from agent.gate.speed import SpeedReport, SpeedSettings, measure
from agent.telemetry.conditions import ConditionsWatch, describe
from protocol.manifest import GateSpec
from protocol.messages import ReasonCode

__all__ = [
    "ConditionsWatch",
    "GateResult",
    "NotJudged",
    "SpeedSettings",
    "check_accuracy",
    "load_golden",
    "run_gate",
]

# (attempt number, attempts allowed, what moved, seconds until the next attempt)
NotJudged = Callable[[int, int, list[str], float], None]

log = structlog.get_logger(__name__)


@dataclass
class GateResult:
    passed: bool
    code: (
        str | None
    )  # ReasonCode value: accuracy | latency_regression | latency_budget | throughput |
    # not_judged (the clocks or thermal state moved in every speed run: no verdict)
    reason: str | None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def p99_ms(self) -> float | None:
        """The candidate's p99 at the gate (what probation compares live p99 against)."""
        value = self.figures.get("p99_ms")
        return float(value) if value is not None else None


def _load(backend: Backend, path: Path) -> Engine:
    # The active engine may come from another backend (e.g. before a switch to TensorRT),
    # so load by sidecar unless it is ours; either way the file's hash is checked first.
    from agent.engines import load_engine
    from agent.engines.sidecar import verify_engine_file

    meta = verify_engine_file(path)
    if meta.backend == backend.name:
        return backend.load(path)
    return load_engine(path)


def run_gate(
    backend: Backend,
    candidate: Path,
    active: Path | None,
    golden: Path,
    spec: GateSpec,
    *,
    speed: SpeedSettings | None = None,
    watch: ConditionsWatch | None = None,
    on_not_judged: NotJudged | None = None,
) -> GateResult:
    """Judge `candidate` (an engine file with its sidecar) against `active` (or None).

    Raises EngineError when an engine cannot be loaded at all, and protocol BundleError
    for an unreadable golden file: those are build/bundle failures, not gate verdicts.
    """
    started = time.monotonic()
    inputs, expected = load_golden(golden)
    figures: dict[str, Any] = {
        "backend": backend.name,
        "backend_version": backend.version,
        "atol": spec.atol,
        "rtol": spec.rtol,
        "max_regression_pct": spec.max_regression_pct,
        "latency_p99_budget_ms": spec.latency_p99_ms,
        "min_throughput": spec.min_throughput,
        "compared_with_active": active is not None,
    }
    cand = _load(backend, Path(candidate))
    act: Engine | None = None
    try:
        refused = _check_placement(cand, spec, figures)
        if refused is not None:
            return _done(figures, started, ReasonCode.GPU_FALLBACK, refused)
        try:
            got = cand.infer(inputs)
        except EngineError as e:
            acc = AccuracyReport(
                passed=False, reason=f"the engine cannot run the golden inputs: {e}"
            )
        else:
            acc = check_accuracy(got, expected, spec)
        figures["accuracy"] = acc.figures()
        if not acc.passed:
            return _done(figures, started, ReasonCode.ACCURACY, acc.reason)

        if active is not None:
            try:
                act = _load(backend, Path(active))
            except EngineError as e:
                # A broken active engine must not block the deploy that replaces it: judge
                # the candidate on the absolute budget alone, and say so in the figures.
                log.warning("gate_active_unloadable", active=str(active), reason=e.reason)
                figures["compared_with_active"] = False
                figures["active_unavailable"] = e.reason
        sp, moved = _measure_stable(cand, act, inputs, spec, speed, watch, on_not_judged)
        figures["speed"] = sp.figures()
        figures["speed_attempts"] = len(moved) + (0 if sp.not_judged else 1)
        if sp.not_judged:
            figures["not_judged"] = moved
            return _done(
                figures,
                started,
                ReasonCode.NOT_JUDGED,
                f"not judged: {describe(sp.not_judged)} in each of {len(moved)} speed "
                "runs; no verdict on the model",
            )
        c = sp.candidate
        figures["p50_ms"], figures["p99_ms"] = c.get("p50_ms"), c.get("p99_ms")
        figures["throughput_ips"] = c.get("throughput_ips")
        if sp.regression and sp.comparison is not None:
            cmp_ = sp.comparison
            lo, hi = cmp_["ci_change_pct"]
            return _done(
                figures,
                started,
                ReasonCode.LATENCY_REGRESSION,
                "the candidate is slower than the active engine by "
                f"{cmp_['median_change_pct']:.1f}% (median of {cmp_['pairs']} interleaved "
                f"pairs, {cmp_['confidence']:.0%} interval {_pct(lo)} to {_pct(hi)}), more "
                f"than the allowed {spec.max_regression_pct:g}%",
            )
        if spec.latency_p99_ms is not None and c["p99_ms"] > spec.latency_p99_ms:
            return _done(
                figures,
                started,
                ReasonCode.LATENCY_BUDGET,
                f"the candidate's p99 latency is {c['p99_ms']:.3f} ms, over the budget of "
                f"{spec.latency_p99_ms:g} ms ({c['samples']} runs)",
            )
        tput = c.get("throughput_ips")
        if spec.min_throughput is not None and (tput is None or tput < spec.min_throughput):
            return _done(
                figures,
                started,
                ReasonCode.THROUGHPUT,
                f"the candidate's throughput is {tput} inferences/s, under the minimum of "
                f"{spec.min_throughput:g}/s",
            )
        return _done(figures, started, None, None)
    finally:
        cand.close()
        if act is not None:
            act.close()


def _measure_stable(
    cand: Engine,
    act: Engine | None,
    inputs: dict[str, Any],
    spec: GateSpec,
    speed: SpeedSettings | None,
    watch: ConditionsWatch | None,
    on_not_judged: NotJudged | None,
) -> tuple[SpeedReport, list[list[str]]]:
    """Measure until a run's conditions hold still, at most `attempts` runs.

    Returns the last report and what moved in each run that was not judged.
    """
    s = speed or SpeedSettings()
    moved: list[list[str]] = []
    attempts = max(1, s.attempts)
    while True:
        sp = measure(cand, act, inputs, spec.max_regression_pct, s, watch)
        if not sp.not_judged:
            return sp, moved
        moved.append(sp.not_judged)
        n = len(moved)
        wait = s.retry_wait_s if n < attempts else 0.0
        log.warning("gate_not_judged", attempt=n, attempts=attempts, moved=sp.not_judged,
                    retry_in_s=wait if n < attempts else None)  # fmt: skip
        if on_not_judged is not None:
            on_not_judged(n, attempts, sp.not_judged, wait)
        if n >= attempts:
            return sp, moved
        time.sleep(wait)


def _check_placement(engine: Engine, spec: GateSpec, figures: dict[str, Any]) -> str | None:
    """Record where the engine's layers run (TensorRT engines say, by their inspector) and
    refuse it past the manifest's max_gpu_fallback_layers; None when it may go on."""
    placement_of = getattr(engine, "layer_placement", None)
    if placement_of is None:
        return None  # ONNX Runtime: no DLA, nothing to count
    placement = placement_of()
    figures["layers"] = placement
    limit = spec.max_gpu_fallback_layers
    if limit is None:
        return None
    if placement is None:
        return (
            "the engine does not say which layers run on the GPU (built without detailed "
            f"layer information), so max_gpu_fallback_layers = {limit} cannot be checked"
        )
    if placement["gpu"] > limit:
        return (
            f"{placement['gpu']} of the engine's {placement['gpu'] + placement['dla']} layers "
            f"run on the GPU ({placement['dla']} on the DLA), more than the "
            f"max_gpu_fallback_layers of {limit}"
        )
    return None


def _pct(x: float | None) -> str:
    return "unbounded" if x is None else f"{x:+.1f}%"


def _done(
    figures: dict[str, Any], started: float, code: ReasonCode | None, reason: str | None
) -> GateResult:
    figures["wall_s"] = round(time.monotonic() - started, 3)
    result = GateResult(passed=code is None, code=code.value if code else None, reason=reason,
                        figures=figures)  # fmt: skip
    log.info("gate_done", passed=result.passed, code=result.code, reason=reason,
             p99_ms=figures.get("p99_ms"), wall_s=figures["wall_s"])  # fmt: skip
    return result
