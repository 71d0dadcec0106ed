"""Small, dependency-free statistics for the gate (numpy only).

The speed verdict rests on paired samples: in pair i the candidate and the active engine
run back to back on the same input, so whatever slows the machine at that moment slows
both, and the per-pair log ratio r_i = ln(t_candidate / t_active) cancels it. We then
ask about the median of r: its confidence interval comes from order statistics (the
sign test inverted), which needs no assumption about the shape of the noise, and a
stray spike moves it by at most one rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Two-sided 99%: the gate looks at the interval after every batch of pairs, so an early
# "no regression" stop uses a stricter level than 95% to keep repeated looks honest.
DEFAULT_Z = 2.576


@dataclass(frozen=True)
class MedianInterval:
    n: int
    median: float
    low: float  # -inf when n is too small for any interval at this level
    high: float  # +inf likewise


def median_interval(values: np.ndarray, z: float = DEFAULT_Z) -> MedianInterval:
    """Distribution-free CI of the median from order statistics (normal approx. to B(n,½)).

    With sorted x, the interval [x_(k), x_(n-k+1)] (1-based) covers the median with
    probability ≈ 1-α when k = floor(n/2 - z·√n/2); that is exact enough from n ≈ 20.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = int(x.size)
    if n == 0:
        return MedianInterval(0, math.nan, -math.inf, math.inf)
    med = float(np.median(x))
    k = math.floor(n / 2 - z * math.sqrt(n) / 2)
    if k < 1:
        return MedianInterval(n, med, -math.inf, math.inf)
    return MedianInterval(n, med, float(x[k - 1]), float(x[n - k]))


def percentiles_ms(samples_s: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/mean/min/max in milliseconds (linear interpolation, numpy's default)."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 4),
        "p90_ms": round(float(p90), 4),
        "p99_ms": round(float(p99), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "min_ms": round(float(ms.min()), 4),
        "max_ms": round(float(ms.max()), 4),
    }


def ratio_pct(log_ratio: float) -> float:
    """A log ratio as a percent change: ln(1.15) -> 15.0."""
    if math.isinf(log_ratio):
        return log_ratio
    return (math.exp(log_ratio) - 1.0) * 100.0
