"""SLO expressions and verdicts (controller/rollouts/slo.py): pure, no I/O."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from controller.rollouts.slo import (
    FAIL,
    NOT_ENOUGH_DATA,
    PASS,
    SloError,
    judge,
    parse_duration,
    parse_slo,
    t_quantile,
)
from protocol.telemetry import (
    GpuStats,
    MetricStats,
    ModelStats,
    TelemetrySample,
    VersionMetrics,
)


def test_expressions_parse_to_relative_and_absolute_thresholds() -> None:
    assert parse_slo("latency_p99 <= +10%").threshold == pytest.approx(0.10)
    assert parse_slo("confidence_mean>=-2%").relative
    s = parse_slo("gpu_temp_c < 85")
    assert (s.metric, s.op, s.threshold, s.relative) == ("gpu_temp_c", "<", 85.0, False)
    assert parse_slo("inference_errors == 0").expr == "inference_errors == 0"


@pytest.mark.parametrize(
    "bad", ["latency_p99", "latency_p99 <= ten%", "x == +1%", "<= 5", "x <= -100%", "x =< 3"]
)
def test_bad_expressions_are_one_line_errors(bad: str) -> None:
    with pytest.raises(SloError) as e:
        parse_slo(bad)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_durations() -> None:
    assert parse_duration("90s", "--bake") == 90
    assert parse_duration("10m", "--bake") == 600
    assert parse_duration("2", "--bake") == 2
    for bad in ("0s", "soon", "-1m"):
        with pytest.raises(SloError):
            parse_duration(bad, "--bake")


@pytest.mark.parametrize(
    ("p", "df", "table"),
    [
        (0.995, 1, 63.657),
        (0.995, 2, 9.925),
        (0.995, 3, 5.841),
        (0.995, 5, 4.032),
        (0.995, 10, 3.169),
        (0.975, 30, 2.042),
        (0.995, 120, 2.617),
    ],
)
def test_t_quantiles_match_the_table(p: float, df: float, table: float) -> None:
    assert t_quantile(p, df) == pytest.approx(table, abs=2e-3)


def _cohort(rng: random.Random, prefix: str, devices: int, mean: float, n: int = 30):
    out = {}
    for i in range(devices):
        dev_mean = mean * (1 + rng.gauss(0, 0.03))  # unit-to-unit spread
        out[f"{prefix}{i}"] = [dev_mean * (1 + rng.gauss(0, 0.05)) for _ in range(n)]
    return out


def test_a_clear_regression_fails_with_its_figures() -> None:
    rng = random.Random(7)
    v = judge(
        parse_slo("latency_p99 <= +10%"),
        _cohort(rng, "new", 4, 13.0),
        _cohort(rng, "old", 6, 10.0),
    )
    assert v.verdict == FAIL
    assert v.change == pytest.approx(0.30, abs=0.05)
    assert v.low is not None and v.low > 0.10
    assert "+10%" in v.reason and "interval" in v.reason


def test_an_unchanged_version_passes() -> None:
    rng = random.Random(8)
    v = judge(
        parse_slo("confidence_mean >= -2%"),
        _cohort(rng, "new", 3, 0.8),
        _cohort(rng, "old", 5, 0.8),
    )
    assert v.verdict == PASS
    assert v.low is not None and v.high is not None and v.low < v.change < v.high  # type: ignore[operator]


def test_a_straddling_interval_does_not_fail() -> None:
    """Lower by 3% against a -2% limit, but with this noise the interval reaches above."""
    rng = random.Random(9)
    v = judge(
        parse_slo("confidence_mean >= -2%"), _cohort(rng, "n", 2, 0.776), _cohort(rng, "o", 2, 0.8)
    )
    assert v.verdict == PASS and v.high is not None and v.high > -0.02


def test_too_few_samples_is_its_own_verdict() -> None:
    rng = random.Random(1)
    v = judge(
        parse_slo("latency_p99 <= +10%"), _cohort(rng, "n", 1, 20.0, n=3), _cohort(rng, "o", 3, 10)
    )
    assert v.verdict == NOT_ENOUGH_DATA and "needs 10 samples" in v.reason


def test_one_canary_borrows_the_baselines_device_spread() -> None:
    rng = random.Random(2)
    v = judge(
        parse_slo("latency_p99 <= +10%"), _cohort(rng, "n", 1, 13.0), _cohort(rng, "o", 5, 10)
    )
    assert v.verdict == FAIL and v.canary_devices == 1


def test_one_device_against_one_other_is_not_enough_unless_paired() -> None:
    rng = random.Random(3)
    new, old = {"a": _cohort(rng, "n", 1, 13.0)["n0"]}, {"b": _cohort(rng, "o", 1, 10.0)["o0"]}
    assert judge(parse_slo("latency_p99 <= +10%"), new, old).verdict == NOT_ENOUGH_DATA
    same = {"a": old["b"]}
    assert judge(parse_slo("latency_p99 <= +10%"), new, same, paired=True).verdict == FAIL


def test_absolute_limits_hold_per_device() -> None:
    hot = {"a": [70.0 + i % 3 for i in range(20)], "b": [90.0 + i % 3 for i in range(20)]}
    v = judge(parse_slo("gpu_temp_c < 85"), hot, {})
    assert v.verdict == FAIL and v.reason.startswith("b:")
    cool = {"a": [70.0 + i % 3 for i in range(20)]}
    assert judge(parse_slo("gpu_temp_c < 85"), cool, {}).verdict == PASS


def test_exact_limits_fail_on_any_sample() -> None:
    errors = {"a": [0.0] * 30, "b": [0.0] * 29 + [2.0]}
    v = judge(parse_slo("inference_errors == 0"), errors, {})
    assert v.verdict == FAIL and "1 of 30" in v.reason
    assert (
        judge(parse_slo("inference_errors == 0"), {"a": [0.0] * 5}, {}).verdict == NOT_ENOUGH_DATA
    )


def _sample(version: str, conf: float, p99: float, errors: int = 0) -> TelemetrySample:
    return TelemetrySample(
        schema="jetfleet.telemetry/v1",
        device_id="r1",
        at=datetime.now(timezone.utc),
        uptime_s=1,
        gpu=GpuStats(source="sysfs", temp_c=61.0),
        models={
            "det": ModelStats(
                version=version,
                p99_ms=p99,
                count=10,
                metrics={
                    version: VersionMetrics(
                        metrics={
                            "confidence": MetricStats(kind="gauge", n=5, mean=conf, max=0.99),
                            "detections": MetricStats(kind="counter", n=5, sum=12),
                        },
                        errors=errors,
                    )
                },
            )
        },
    )


def test_metric_names_map_to_telemetry_and_service_metrics() -> None:
    s = _sample("2", 0.71, 14.5, errors=1)
    v = lambda expr, version="2": parse_slo(expr).value(s, "det", version)  # noqa: E731
    assert v("latency_p99 <= +1%") == 14.5
    assert v("inference_errors == 0") == 1
    assert v("gpu_temp_c < 85") == 61.0
    assert v("confidence >= -2%") == 0.71
    assert v("confidence_mean >= -2%") == 0.71
    assert v("confidence_max >= -2%") == 0.99
    assert v("detections >= -2%") == 12
    assert v("latency_p99 <= +1%", version="1") is None  # the device runs version 2
    assert v("nonexistent_mean >= 1") is None


def test_each_devices_own_past_cancels_the_unit_to_unit_spread() -> None:
    """A 10% loss on the robot that always scored 10% above the others: its level now
    looks like everyone's; its change from its own past does not."""
    rng = random.Random(11)
    levels = {"r0": 0.88, "r1": 0.78, "r2": 0.79, "r3": 0.80, "r4": 0.81, "r5": 0.82}

    def window(devices: list[str], factor: float = 1.0) -> dict[str, list[float]]:
        return {
            d: [levels[d] * factor * (1 + rng.gauss(0, 0.02)) for _ in range(20)] for d in devices
        }

    canary, rest = ["r0"], ["r1", "r2", "r3", "r4", "r5"]
    slo = parse_slo("confidence_mean >= -2%")
    now, old = window(canary, 0.9), window(rest)
    assert judge(slo, now, old).verdict == PASS  # by levels, nothing changed
    v = judge(slo, now, old, canary_before=window(canary), baseline_before=window(rest))
    assert v.verdict == FAIL and "own window before the switch" in v.reason
    assert v.change == pytest.approx(-0.10, abs=0.02)


def test_without_history_the_levels_decide() -> None:
    rng = random.Random(12)
    now = _cohort(rng, "n", 3, 13.0)
    v = judge(
        parse_slo("latency_p99 <= +10%"),
        now,
        _cohort(rng, "o", 4, 10.0),
        canary_before={},
        baseline_before={},
    )
    assert v.verdict == FAIL and "own window" not in v.reason


def test_the_rollout_policy_keeps_the_slos_for_resume() -> None:
    from controller.rollouts.policy import RolloutPolicy, make_policy

    p = make_policy(slos=("latency_p99<=+10%", "gpu_temp_c < 85"), bake="2m", now=0)
    assert p.slos == ("latency_p99 <= +10%", "gpu_temp_c < 85")
    assert (p.bake, p.bake_max, p.slo_inconclusive) == (120, 360, "abort")
    assert RolloutPolicy.from_json(p.to_json()) == p
    assert "bake 120s (up to 360s for data)" in p.describe()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"slos": ("latency_p99 <= +10%",)}, "--slo needs --bake"),
        ({"bake": "1m"}, "--bake needs at least one --slo"),
        ({"slos": ("x > 1",), "bake": "1m", "bake_max": "30s"}, "shorter than --bake"),
        ({"slos": ("x > 1",), "bake": "1m", "slo_inconclusive": "maybe"}, "abort or continue"),
        ({"slos": ("x >> 1",), "bake": "1m"}, "expected METRIC OP VALUE"),
    ],
)
def test_slo_options_that_cannot_run_are_refused_in_one_line(kw: dict, message: str) -> None:  # type: ignore[type-arg]
    from controller.rollouts.policy import PolicyError, make_policy

    with pytest.raises(PolicyError, match=message):
        make_policy(now=0, **kw)
