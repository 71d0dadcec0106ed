"""Fleet SLO gates: parse an SLO and judge a canary cohort against a baseline (pure).

An SLO is `METRIC OP THRESHOLD`:

    latency_p99 <= +10%        relative: the canary mean at most 10% above the baseline's
    confidence_mean >= -2%     relative: at most 2% below
    gpu_temp_c < 85            absolute: a limit every canary device must hold
    inference_errors == 0      absolute, exact: any error on any canary device violates

Metric names are telemetry fields (`BUILTIN`) or the service's own metrics
(`rt.count`/`rt.gauge`): `NAME` (a gauge's interval mean, a counter's interval sum) or
`NAME_mean|_min|_max|_last|_sum|_n`.

The test (relative SLOs). The unit of analysis is the device: each device's samples in
the window are averaged first, and the cohorts are compared through their per-device
means with Welch's t interval. Samples of one robot are not independent (its scene, its
thermal state, its unit-to-unit spread all persist over minutes), so treating every
sample as independent would shrink the interval by √(samples per device) and abort on
device-to-device variance alone; the per-device mean carries that variance honestly,
and Welch does not assume the two cohorts have equal variances (the new version may
well change the spread). A relative threshold t is judged as the linear contrast
`canary − (1+t)·baseline`, whose variance is `v_c + (1+t)²·v_b`: no ratio approximation.

Small cohorts: a first wave is often a single robot. A cohort of one device has no
device-to-device variance of its own; it borrows the other cohort's (same fleet, same
hardware), with that cohort's degrees of freedom. When both cohorts have one device
each, device-to-device variance is unknown: the comparison is NOT_ENOUGH_DATA, except
for the same device before and after its switch (`paired`), where the device is its own
control and its samples are the unit.

Absolute SLOs are per-device limits (a robot at 95 °C is not excused by cool ones):
each canary device's mean gets a t interval from its samples, and the SLO fails when one
device's interval lies entirely beyond the limit; `==`/`!=` compare every sample exactly.

Discipline (as the gate's): a cohort needs `min_samples` samples (and each absolute
judgement `min_samples` per device) or the verdict is NOT_ENOUGH_DATA; FAIL only when the
whole interval (two-sided, `confidence`, 95% by default) is on the violating side;
otherwise PASS. 95% rather than the speed gate's 99%: the SLO's own margin (`-2%` is not
`0%`) already keeps an unchanged version from aborting (bench/slo_verdicts.py measures
false aborts well under 1% per judgement), while 99% with a handful of devices (t with 2
degrees of freedom is 9.9 at 99%, 4.3 at 95%) would miss a 10% loss on a small wave.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

from protocol.errors import CodedError
from protocol.telemetry import TelemetrySample

PASS = "PASS"
FAIL = "FAIL"
NOT_ENOUGH_DATA = "NOT_ENOUGH_DATA"
VERDICTS = (PASS, FAIL, NOT_ENOUGH_DATA)

DEFAULT_CONFIDENCE = 0.95
DEFAULT_MIN_SAMPLES = 10

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_EXPR = re.compile(
    r"^\s*(?P<metric>[A-Za-z][A-Za-z0-9_.:-]*)\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<value>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<pct>%)?\s*$"
)
_STATS = ("mean", "min", "max", "last", "sum", "n")


class SloError(CodedError):
    """An SLO expression the rollout cannot judge (one line, naming the expression)."""

    code = "bad_slo"


def _latency(field: str) -> Callable[[TelemetrySample, str, str], float | None]:
    def get(s: TelemetrySample, model: str, version: str) -> float | None:
        m = s.models.get(model)
        return getattr(m, field) if m is not None and m.version == version else None

    return get


def _errors(s: TelemetrySample, model: str, version: str) -> float | None:
    m = s.models.get(model)
    vm = m.metrics.get(version) if m is not None else None
    if vm is not None:
        return float(vm.errors)
    return 0.0 if m is not None and m.version == version else None


def _device(get: Callable[[TelemetrySample], float | None]) -> Callable[..., float | None]:
    """A device-level field counts for a version while the device runs it."""

    def on_version(s: TelemetrySample, model: str, version: str) -> float | None:
        m = s.models.get(model)
        return get(s) if m is not None and m.version == version else None

    return on_version


def _power(s: TelemetrySample) -> float | None:
    p = s.gpu.input_power_mw if s.gpu is not None else None
    return p / 1000.0 if p is not None else None


def _temp_max(s: TelemetrySample) -> float | None:
    temps = list(s.temps.values()) + ([s.gpu.temp_c] if s.gpu and s.gpu.temp_c else [])
    return max(temps) if temps else None


# Telemetry fields an SLO can name; anything else is a service metric.
BUILTIN: dict[str, Callable[[TelemetrySample, str, str], float | None]] = {
    "latency_p50": _latency("p50_ms"),
    "latency_p99": _latency("p99_ms"),
    "inference_errors": _errors,
    "gpu_temp_c": _device(lambda s: s.gpu.temp_c if s.gpu else None),
    "temp_max_c": _device(_temp_max),
    "cpu_pct": _device(lambda s: s.cpu.mean_percent),
    "gpu_load_pct": _device(lambda s: s.gpu.load_pct if s.gpu else None),
    "power_w": _device(_power),
    "mem_used": _device(lambda s: float(s.mem.used) if s.mem else None),
}


@dataclass(frozen=True)
class Slo:
    metric: str
    op: str
    threshold: float
    relative: bool  # threshold is a fraction of the baseline (+0.10 for +10%)

    @property
    def expr(self) -> str:
        if self.relative:
            return f"{self.metric} {self.op} {self.threshold * 100:+g}%"
        return f"{self.metric} {self.op} {self.threshold:g}"

    def value(self, sample: TelemetrySample, model: str, version: str) -> float | None:
        """This SLO's metric in one telemetry sample, for `version` of `model` (None when
        the sample says nothing about that version)."""
        get = BUILTIN.get(self.metric)
        if get is not None:
            return get(sample, model, version)
        return _service_metric(sample, model, version, self.metric)


def _service_metric(s: TelemetrySample, model: str, version: str, name: str) -> float | None:
    m = s.models.get(model)
    vm = m.metrics.get(version) if m is not None else None
    if vm is None:
        return None
    stat = None
    if name not in vm.metrics:
        base, _, stat = name.rpartition("_")
        if stat not in _STATS or base not in vm.metrics:
            return None
        name = base
    ms = vm.metrics[name]
    if stat is None:
        stat = "mean" if ms.kind == "gauge" else "sum"
    v = getattr(ms, stat)
    return float(v) if v is not None else None


def parse_slo(expr: str) -> Slo:
    """`latency_p99 <= +10%` → Slo. A percentage is relative to the baseline; a plain
    number is an absolute limit. Relative SLOs take <, <=, >, >= only."""
    m = _EXPR.match(expr)
    if m is None:
        raise SloError(
            f"--slo {expr!r}: expected METRIC OP VALUE[%] (e.g. 'latency_p99 <= +10%', "
            "'gpu_temp_c < 85')"
        )
    relative = m["pct"] is not None
    if relative and m["op"] in ("==", "!="):
        raise SloError(f"--slo {expr!r}: a relative threshold takes <, <=, > or >=")
    value = float(m["value"])
    if relative and value <= -100:
        raise SloError(f"--slo {expr!r}: a relative threshold must be above -100%")
    return Slo(m["metric"], m["op"], value / 100.0 if relative else value, relative)


def parse_duration(text: str, option: str) -> float:
    """`90s`, `10m`, `1h`, or plain seconds."""
    t = text.strip()
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise SloError(f"{option} {text!r}: expected a duration (90s, 10m, 1h)") from None
    if not seconds > 0 or math.isinf(seconds):
        raise SloError(f"{option} {text!r}: must be positive")
    return seconds


# -- statistics ---------------------------------------------------------------------------
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (no SciPy on the controller): exact for 1 and 2 degrees of
    freedom; from 8 on, the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5, within
    0.05% of the table); between, that expansion refined by Newton steps on the CDF
    (Simpson's rule on the density), since the expansion alone is 1% short at 3."""
    if df <= 0 or math.isnan(df):
        return math.inf
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    if math.isinf(df):
        return z
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    t = z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    if df >= 8:
        return t
    for _ in range(4):
        t -= (_t_cdf(t, df) - p) / _t_pdf(t, df)
    return t


def _t_pdf(t: float, df: float) -> float:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(c - (df + 1) / 2 * math.log1p(t * t / df))


def _t_cdf(t: float, df: float, steps: int = 256) -> float:
    h = t / steps
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, steps))
    return 0.5 + h / 3 * (_t_pdf(0.0, df) + inner + _t_pdf(t, df))


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    return m, (sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else math.nan)


@dataclass(frozen=True)
class Cohort:
    """Per-device means and sample counts of one cohort over the window."""

    devices: int
    samples: int
    mean: float  # of the per-device means
    var: float  # between-device variance of the per-device means (nan with one device)
    sample_var: float  # of the pooled samples (a single device's within-device spread)

    @classmethod
    def of(cls, values: Mapping[str, Sequence[float]]) -> Cohort:
        per = [list(v) for v in values.values() if v]
        if not per:
            return cls(0, 0, math.nan, math.nan, math.nan)
        means = [sum(v) / len(v) for v in per]
        mean, var = _mean_var(means)
        flat = [x for v in per for x in v]
        return cls(len(per), len(flat), mean, var, _mean_var(flat)[1])


@dataclass(frozen=True)
class Verdict:
    """One SLO judged once, with the figures that decided it."""

    slo: str
    verdict: str
    reason: str
    canary_devices: int = 0
    canary_samples: int = 0
    baseline_devices: int = 0
    baseline_samples: int = 0
    canary_mean: float | None = None
    baseline_mean: float | None = None
    change: float | None = None  # relative: (canary - baseline) / baseline
    low: float | None = None  # interval on the judged quantity (relative: change; abs: mean)
    high: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: the SLO, the verdict and its figures (the abort reason on FAIL)."""
        return f"SLO {self.slo} {self.verdict}: {self.reason}"


def judge(
    slo: Slo,
    canary: Mapping[str, Sequence[float]],
    baseline: Mapping[str, Sequence[float]],
    *,
    canary_before: Mapping[str, Sequence[float]] | None = None,
    baseline_before: Mapping[str, Sequence[float]] | None = None,
    paired: bool = False,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Verdict:
    """Judge `slo` on the canary cohort's values (device → samples) against the baseline's
    (ignored by absolute SLOs). `paired`: the baseline is the same devices before their
    switch. With `canary_before` (and `baseline_before` unless paired), a relative SLO is
    judged on each device's change against its own past (see `_judge_changes`)."""
    if not slo.relative:
        return _judge_absolute(slo, canary, min_samples, confidence)
    if canary_before is not None:
        verdict = _judge_changes(
            slo,
            canary,
            canary_before,
            None if paired else baseline,
            baseline_before,
            min_samples,
            confidence,
        )
        if verdict is not None:
            return verdict
    return _judge_relative(
        slo, Cohort.of(canary), Cohort.of(baseline), paired, min_samples, confidence
    )


@dataclass(frozen=True)
class _Change:
    """One device's log ratio of its mean after to its mean before, and that ratio's
    variance from its own samples (delta method)."""

    log_ratio: float
    var: float
    after: int
    before: int


def _changes(
    after: Mapping[str, Sequence[float]], before: Mapping[str, Sequence[float]]
) -> dict[str, _Change] | None:
    """Devices with samples in both windows; None when a mean is not positive (a log
    ratio needs positive levels: the level comparison judges those)."""
    out = {}
    for d, a in after.items():
        b = before.get(d) or ()
        if len(a) < 2 or len(b) < 2:
            continue
        (ma, va), (mb, vb) = _mean_var(a), _mean_var(b)
        if ma <= 0 or mb <= 0:
            return None
        var = va / (len(a) * ma * ma) + vb / (len(b) * mb * mb)
        out[d] = _Change(math.log(ma / mb), var, len(a), len(b))
    return out


def _judge_changes(
    slo: Slo,
    canary: Mapping[str, Sequence[float]],
    canary_before: Mapping[str, Sequence[float]],
    baseline: Mapping[str, Sequence[float]] | None,
    baseline_before: Mapping[str, Sequence[float]] | None,
    min_samples: int,
    confidence: float,
) -> Verdict | None:
    """Difference in differences on the log scale: each device's change from its own
    window before the switch (so its unit-to-unit level cancels), the canary cohort's
    mean change minus the baseline cohort's over the same times (so a trend that moves
    the whole fleet cancels too); without a baseline cohort, the canary's change alone.
    Welch's t interval on the per-device log ratios; a cohort of one device borrows the
    other's spread, or, with no other, uses its own samples' variance. None when the
    windows before hold too few samples (or a level is not positive): then the levels of
    the bake window decide."""
    c = _changes(canary, canary_before)
    b = _changes(baseline, baseline_before or {}) if baseline is not None else {}
    if c is None or b is None:
        return None
    figures: dict[str, Any] = {
        "canary_devices": len(c),
        "canary_samples": sum(x.after for x in c.values()),
        "baseline_devices": len(b),
        "baseline_samples": sum(x.after for x in b.values()),
        "threshold": slo.threshold,
    }
    need = [c] + ([b] if baseline is not None else [])
    if any(sum(x.before for x in cohort.values()) < min_samples for cohort in need):
        return None  # too little history (telemetry began lately): the levels decide
    if any(sum(x.after for x in cohort.values()) < min_samples for cohort in need):
        return None  # the level comparison says how short the bake window is
    (dc, vc, dfc), (db, vb, dfb) = _log_cohorts(c, b)
    diff, se2 = dc - db, vc + vb
    half = t_quantile(0.5 + confidence / 2, _welch_df(vc, dfc, vb, dfb)) * math.sqrt(se2)
    limit = math.log1p(slo.threshold)
    above = slo.op in ("<", "<=")
    failed = diff - half > limit if above else diff + half < limit
    change, low, high = math.expm1(diff), math.expm1(diff - half), math.expm1(diff + half)
    figures.update(change=change, low=low, high=high)
    figures.update(
        canary_mean=_pooled_mean(canary), baseline_mean=_pooled_mean(baseline or canary_before)
    )
    against = (
        f"against {len(b)} devices still on the old version" if b else "against their own past"
    )
    words = (
        f"change {change * 100:+.2f}% ({confidence * 100:g}% interval {low * 100:+.2f}%.."
        f"{high * 100:+.2f}%) on {len(c)} devices/{figures['canary_samples']} samples, each "
        f"against its own window before the switch, {against}"
    )
    return _interval_verdict(slo, failed=failed, above=above, words=words, figures=figures)


def _interval_verdict(
    slo: Slo, *, failed: bool, above: bool, words: str, figures: dict[str, Any]
) -> Verdict:
    if not failed:
        return Verdict(slo.expr, PASS, words, **figures)
    side = "above" if above else "below"
    reason = f"{words}: the whole interval is {side} {slo.threshold * 100:+g}%"
    return Verdict(slo.expr, FAIL, reason, **figures)


def _pooled_mean(values: Mapping[str, Sequence[float]]) -> float | None:
    flat = [x for v in values.values() for x in v]
    return sum(flat) / len(flat) if flat else None


def _log_cohorts(
    c: dict[str, _Change], b: dict[str, _Change]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean log ratio, variance of that mean, degrees of freedom) of each cohort; an empty
    baseline is (0, 0, 0)."""

    def own(x: dict[str, _Change]) -> tuple[float, float, float]:
        (d,) = x.values()
        return d.log_ratio, d.var, float(min(d.after, d.before) - 1)

    def spread(x: dict[str, _Change]) -> tuple[float, float, int]:
        m, v = _mean_var([d.log_ratio for d in x.values()])
        return m, v, len(x) - 1

    if not b:
        if len(c) == 1:
            return own(c), (0.0, 0.0, 0)
        m, v, df = spread(c)
        return (m, v / len(c), df), (0.0, 0.0, 0)
    if len(c) >= 2 and len(b) >= 2:
        (mc, v1, d1), (mb, v2, d2) = spread(c), spread(b)
        return (mc, v1 / len(c), d1), (mb, v2 / len(b), d2)
    if len(c) == 1 and len(b) == 1:
        return own(c), own(b)
    big, small = (b, c) if len(c) == 1 else (c, b)
    mbig, vbig, dfbig = spread(big)
    msmall = next(iter(small.values())).log_ratio
    out_big, out_small = (mbig, vbig / len(big), dfbig), (msmall, vbig, dfbig)
    return (out_small, out_big) if small is c else (out_big, out_small)


def _judge_relative(
    slo: Slo, c: Cohort, b: Cohort, paired: bool, min_samples: int, confidence: float
) -> Verdict:
    figures: dict[str, Any] = {
        "canary_devices": c.devices,
        "canary_samples": c.samples,
        "baseline_devices": b.devices,
        "baseline_samples": b.samples,
        "threshold": slo.threshold,
    }
    short = _too_few(c, b, paired, min_samples)
    if short:
        return Verdict(slo.expr, NOT_ENOUGH_DATA, short, **figures)
    k = 1.0 + slo.threshold
    (vc, dfc), (vb, dfb) = _variances(c, b, paired)
    contrast = c.mean - k * b.mean
    se2 = vc + k * k * vb
    df = _welch_df(vc, dfc, k * k * vb, dfb)
    half = t_quantile(0.5 + confidence / 2, df) * math.sqrt(se2)
    # Reported on the relative scale: the contrast's interval divided by the baseline.
    scale = abs(b.mean) if b.mean else math.nan
    low, high = (contrast - half) / scale + slo.threshold, (contrast + half) / scale + slo.threshold
    change = (c.mean - b.mean) / scale
    above = slo.op in ("<", "<=")  # the violating side is above the threshold
    if above:
        failed = contrast - half > 0 or (slo.op == "<" and contrast - half >= 0)
    else:
        failed = contrast + half < 0 or (slo.op == ">" and contrast + half <= 0)
    figures.update(canary_mean=c.mean, baseline_mean=b.mean, change=change, low=low, high=high)
    words = (
        f"change {change * 100:+.2f}% ({confidence * 100:g}% interval {low * 100:+.2f}%.."
        f"{high * 100:+.2f}%), canary mean {c.mean:.4g} on {c.devices} devices/"
        f"{c.samples} samples, baseline {b.mean:.4g} on {b.devices}/{b.samples}"
    )
    return _interval_verdict(slo, failed=failed, above=above, words=words, figures=figures)


def _too_few(c: Cohort, b: Cohort, paired: bool, min_samples: int) -> str | None:
    if c.samples < min_samples or b.samples < min_samples:
        hint = " (no telemetry at all: is `jetfleet serve` ingesting it?)"
        return (
            f"needs {min_samples} samples per cohort: canary has {c.samples} "
            f"(from {c.devices} devices), baseline {b.samples} (from {b.devices})"
            + (hint if c.samples == b.samples == 0 else "")
        )
    if not b.mean:
        return "the baseline mean is 0: a relative threshold has no scale"
    if c.devices < 2 and b.devices < 2 and not paired:
        return (
            "one device per cohort: device-to-device variance is unknown (add devices to "
            "the first wave or keep some on the old version)"
        )
    return None


def _variances(c: Cohort, b: Cohort, paired: bool) -> tuple[tuple[float, int], tuple[float, int]]:
    """(variance of the cohort mean, its degrees of freedom) for each cohort."""
    if c.devices < 2 and b.devices < 2:
        # paired, one device: its own samples before and after are the unit.
        return (c.sample_var / c.samples, c.samples - 1), (b.sample_var / b.samples, b.samples - 1)
    if c.devices < 2:
        return (b.var / c.devices, b.devices - 1), (b.var / b.devices, b.devices - 1)
    if b.devices < 2:
        return (c.var / c.devices, c.devices - 1), (c.var / b.devices, c.devices - 1)
    return (c.var / c.devices, c.devices - 1), (b.var / b.devices, b.devices - 1)


def _welch_df(v1: float, df1: float, v2: float, df2: float) -> float:
    """Welch–Satterthwaite degrees of freedom of v1 + v2."""
    num = (v1 + v2) ** 2
    den = (v1 * v1 / df1 if df1 else 0.0) + (v2 * v2 / df2 if df2 else 0.0)
    if den == 0:
        return float(max(df1, df2, 1))
    return num / den


def _judge_absolute(
    slo: Slo, canary: Mapping[str, Sequence[float]], min_samples: int, confidence: float
) -> Verdict:
    ok = _OPS[slo.op]
    devices = {d: list(v) for d, v in canary.items() if v}
    n = sum(len(v) for v in devices.values())
    figures: dict[str, Any] = {
        "canary_devices": len(devices),
        "canary_samples": n,
        "threshold": slo.threshold,
    }
    if slo.op in ("==", "!="):
        return _judge_exact(slo, devices, n, min_samples, figures)
    short = [d for d, v in devices.items() if len(v) < min_samples]
    if not devices or short:
        return Verdict(
            slo.expr,
            NOT_ENOUGH_DATA,
            f"needs {min_samples} samples on each canary "
            f"device: {', '.join(short) or 'no device'} has fewer",
            **figures,
        )
    worst: tuple[str, float, float, float] | None = None
    for d, v in sorted(devices.items()):
        mean, var = _mean_var(v)
        half = t_quantile(0.5 + confidence / 2, len(v) - 1) * math.sqrt(var / len(v))
        # The bound nearest to the limit: the whole interval violates when it does.
        near = mean - half if slo.op in ("<", "<=") else mean + half
        if not ok(near, slo.threshold) and worst is None:
            worst = (d, mean, mean - half, mean + half)
    if worst is not None:
        d, mean, low, high = worst
        figures.update(canary_mean=mean, low=low, high=high)
        return Verdict(
            slo.expr,
            FAIL,
            f"{d}: mean {mean:.4g} ({confidence * 100:g}% interval "
            f"{low:.4g}..{high:.4g}) over {len(devices[d])} samples breaks "
            f"{slo.op} {slo.threshold:g}",
            **figures,
        )
    all_mean = sum(x for v in devices.values() for x in v) / n
    figures["canary_mean"] = all_mean
    return Verdict(
        slo.expr,
        PASS,
        f"no device's interval is past {slo.threshold:g} "
        f"({len(devices)} devices, {n} samples, mean {all_mean:.4g})",
        **figures,
    )


def _judge_exact(
    slo: Slo, devices: dict[str, list[float]], n: int, min_samples: int, figures: dict[str, Any]
) -> Verdict:
    ok = _OPS[slo.op]
    for d, v in sorted(devices.items()):
        bad = [x for x in v if not ok(x, slo.threshold)]
        if bad:
            figures["canary_mean"] = sum(v) / len(v)
            return Verdict(
                slo.expr,
                FAIL,
                f"{d}: {len(bad)} of {len(v)} samples break "
                f"{slo.op} {slo.threshold:g} (e.g. {bad[0]:g})",
                **figures,
            )
    if n < min_samples:
        return Verdict(
            slo.expr,
            NOT_ENOUGH_DATA,
            f"needs {min_samples} samples: the canary cohort has {n} from {len(devices)} devices",
            **figures,
        )
    return Verdict(
        slo.expr,
        PASS,
        f"every one of {n} samples on {len(devices)} devices holds {slo.op} {slo.threshold:g}",
        **figures,
    )
