"""What `jetfleet telemetry plot` draws, before matplotlib: gaps where a robot was
offline, version changes, latency per model version, and readable byte units."""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Point = tuple[float, float]
MIN_GAP_S = 90.0  # samples further apart than this (or 3 intervals) are a gap, not a line
BYTE_METRICS = frozenset(("mem_used", "mem_total", "swap_used", "disk_free"))
LATENCY = "latency"  # the pseudo-metric: p50/p99 per model version


@dataclass(frozen=True)
class VersionChange:
    ts: float
    model: str
    before: str | None
    after: str | None


def gap_threshold(points: list[Point]) -> float:
    intervals = [b[0] - a[0] for a, b in itertools.pairwise(points)]
    typical = statistics.median(intervals) if intervals else 0.0
    return max(MIN_GAP_S, 3 * typical)


def split_at_gaps(points: list[Point]) -> tuple[list[list[Point]], list[tuple[float, float]]]:
    """Runs of points a line may join, and the (start, end) of each gap between them."""
    if not points:
        return [], []
    limit = gap_threshold(points)
    runs: list[list[Point]] = [[points[0]]]
    gaps: list[tuple[float, float]] = []
    for prev, cur in itertools.pairwise(points):
        if cur[0] - prev[0] > limit:
            gaps.append((prev[0], cur[0]))
            runs.append([])
        runs[-1].append(cur)
    return runs, gaps


def byte_scale(metric: str, values: Iterable[float]) -> tuple[float, str]:
    """(divisor, unit) that keeps a byte metric readable: GiB from 2 GiB up, else MiB."""
    if metric not in BYTE_METRICS:
        return 1.0, ""
    top = max(values, default=0.0)
    return (2.0**30, "GiB") if top >= 2 * 2**30 else (2.0**20, "MiB")


def _models(row: dict[str, Any]) -> dict[str, Any]:
    try:
        models = json.loads(row["payload"]).get("models") or {}
    except (ValueError, AttributeError):
        return {}
    return models if isinstance(models, dict) else {}


def version_changes(rows: Iterable[dict[str, Any]]) -> list[VersionChange]:
    """Each time a model's version differs from the sample before."""
    last: dict[str, str | None] = {}
    changes = []
    for row in rows:
        for name, stats in _models(row).items():
            version = stats.get("version") if isinstance(stats, dict) else None
            if name in last and last[name] != version:
                changes.append(VersionChange(row["ts"], name, last[name], version))
            last[name] = version
    return changes


def latency_by_version(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[Point]]]:
    """{"detector 1.0.0": {"p50_ms": [...], "p99_ms": [...]}}: one series per version."""
    series: dict[str, dict[str, list[Point]]] = {}
    for row in rows:
        for name, stats in _models(row).items():
            if not isinstance(stats, dict):
                continue
            label = f"{name} {stats.get('version') or '?'}"
            for key in ("p50_ms", "p99_ms"):
                if isinstance(stats.get(key), int | float):
                    series.setdefault(label, {}).setdefault(key, []).append(
                        (row["ts"], float(stats[key]))
                    )
    return series
