"""The robot service's own metrics (counters and gauges per model version), end to end.

The service records them through ModelRuntime.count()/gauge() (agent/runtime.py); the
runtime accumulates them in the process and sends aggregated deltas on the LiveStats
socket, a few datagrams per `report_interval_s`, never one per call. The agent's
LiveStats keeps a MetricsBook that merges them until the telemetry loop drains it into
the sample's `models.<name>.metrics.<version>` (protocol/telemetry.py VersionMetrics).

Datagram (little-endian):

    b"JFM1" | u8 len + model | u8 len + version | u32 errors | u32 dropped | u16 n |
    n x (u8 kind | u8 len + name | u32 count | f64 a | f64 b | f64 c | f64 d)

kind 0 is a counter (a = sum), kind 1 a gauge (a = last, b = sum, c = min, d = max).

Bounds, so that a buggy or hostile service can grow neither the agent's memory nor the
telemetry sample past the ingester's 64 KiB: names match NAME_RE and model and version
TAG_RE (at most 128), a datagram holds at most MAX_METRICS_PER_DATAGRAM
entries; per interval the book holds at most `max_models` models, `max_versions` versions
of each, `max_names` distinct names per model version and `max_total` names in all.
Records of a name past a bound are counted in that version's `dropped`; a report of a
model or version past a bound is refused whole (LiveStats counts it in `dropped`).
Stdlib only, like livestats.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import CodedError

METRICS_MAGIC = b"JFM1"
MAX_NAME = 64
MAX_METRICS_PER_DATAGRAM = 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")  # a model's name, a version
COUNTER, GAUGE = 0, 1
_KINDS = ("counter", "gauge")
_HEAD = struct.Struct("<IIH")
_ENTRY = struct.Struct("<Idddd")
MAX_METRICS_DATAGRAM = (
    4 + 2 * 256 + _HEAD.size + MAX_METRICS_PER_DATAGRAM * (2 + MAX_NAME + _ENTRY.size)
)

# One metric's running state: [kind, count, a, b, c, d] (see the datagram's fields).
Entry = list[Any]


class MetricsError(CodedError, ValueError):
    """A datagram that is not a well-formed metrics report."""

    code = "metrics"


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None


def encode_metrics(
    model: str,
    version: str,
    entries: list[tuple[str, Entry]],
    errors: int = 0,
    dropped: int = 0,
) -> bytes:
    """One datagram; the caller splits `entries` into MAX_METRICS_PER_DATAGRAM chunks."""
    m, v = model.encode()[:255], version.encode()[:255]
    parts = [METRICS_MAGIC, bytes([len(m)]), m, bytes([len(v)]), v,
             _HEAD.pack(min(errors, 2**32 - 1), min(dropped, 2**32 - 1), len(entries))]  # fmt: skip
    for name, (kind, n, a, b, c, d) in entries:
        raw = name.encode()
        parts += [bytes([kind, len(raw)]), raw, _ENTRY.pack(min(n, 2**32 - 1), a, b, c, d)]
    return b"".join(parts)


@dataclass
class MetricsReport:
    model: str
    version: str
    errors: int
    dropped: int
    entries: list[tuple[str, Entry]]


def _short_field(data: bytes, pos: int) -> tuple[str, int]:
    n = data[pos]
    return data[pos + 1 : pos + 1 + n].decode(), pos + 1 + n


def decode_metrics(data: bytes) -> MetricsReport:
    try:
        if data[:4] != METRICS_MAGIC:
            raise MetricsError("bad magic")
        model, pos = _short_field(data, 4)
        version, pos = _short_field(data, pos)
        errors, dropped, n = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        if n > MAX_METRICS_PER_DATAGRAM:
            raise MetricsError(f"{n} metrics in one datagram (at most {MAX_METRICS_PER_DATAGRAM})")
        entries = []
        for _ in range(n):
            kind = data[pos]
            name, pos = _short_field(data, pos + 1)
            count, a, b, c, d = _ENTRY.unpack_from(data, pos)
            pos += _ENTRY.size
            entries.append((name, _checked(kind, name, [kind, count, a, b, c, d])))
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise MetricsError(f"truncated or garbled metrics report: {e}") from e
    if pos != len(data):
        raise MetricsError("malformed metrics report")
    if not (TAG_RE.fullmatch(model) and TAG_RE.fullmatch(version)):
        raise MetricsError(f"bad model or version in a metrics report: {model[:80]!r}")
    return MetricsReport(model, version, errors, dropped, entries)


def _checked(kind: int, name: str, entry: Entry) -> Entry:
    if kind not in (COUNTER, GAUGE):
        raise MetricsError(f"unknown metric kind {kind}")
    if not valid_name(name):
        raise MetricsError(f"bad metric name {name[:80]!r}")
    if not all(math.isfinite(x) for x in entry[2:]):
        raise MetricsError(f"metric {name!r}: values must be finite")
    return entry


def merge(into: Entry, new: Entry) -> None:
    """Fold `new` (same kind) into `into`: counts and sums add, a gauge's last is the
    newest, min/max widen."""
    into[1] += new[1]
    if into[0] == COUNTER:
        into[2] += new[2]
        return
    into[2] = new[2]
    into[3] += new[3]
    into[4] = min(into[4], new[4])
    into[5] = max(into[5], new[5])


def to_stats(entry: Entry) -> dict[str, Any] | None:
    """The telemetry form (protocol MetricStats); None when a sum overflowed."""
    kind, n, a, b, c, d = entry
    if kind == COUNTER:
        out = {"kind": "counter", "n": n, "sum": a}
    else:
        out = {"kind": "gauge", "n": n, "last": a, "mean": b / n if n else a, "min": c, "max": d}
    finite = all(math.isfinite(v) for v in out.values() if isinstance(v, float))
    return out if finite else None


@dataclass
class _Version:
    metrics: dict[str, Entry] = field(default_factory=dict)
    errors: int = 0
    dropped: int = 0

    def report(self) -> dict[str, Any]:
        metrics = {}
        dropped = self.dropped
        for name, entry in self.metrics.items():
            stats = to_stats(entry)
            if stats is None:
                dropped += entry[1]
            else:
                metrics[name] = stats
        return {"metrics": metrics, "errors": self.errors, "dropped": dropped}


class MetricsBook:
    """The agent's per-model, per-version aggregate since the last drain. Not locked:
    LiveStats calls it under its own lock."""

    def __init__(
        self,
        *,
        max_models: int = 8,
        max_versions: int = 4,
        max_names: int = 64,
        max_total: int = 192,
    ) -> None:
        self.max_models = max_models
        self.max_versions = max_versions
        self.max_names = max_names
        self.max_total = max_total
        self._total = 0
        self._models: dict[str, dict[str, _Version]] = {}

    def add(self, report: MetricsReport) -> bool:
        """Merge one report; False when its model or version is past the bounds."""
        versions = self._models.get(report.model)
        if versions is None:
            if len(self._models) >= self.max_models:
                return False
            versions = self._models[report.model] = {}
        v = versions.get(report.version)
        if v is None:
            if len(versions) >= self.max_versions:
                return False
            v = versions[report.version] = _Version()
        v.errors += report.errors
        v.dropped += report.dropped
        for name, entry in report.entries:
            self._add_one(v, name, entry)
        return True

    def _add_one(self, v: _Version, name: str, entry: Entry) -> None:
        held = v.metrics.get(name)
        if held is None:
            if len(v.metrics) >= self.max_names or self._total >= self.max_total:
                v.dropped += entry[1]
                return
            v.metrics[name] = list(entry)
            self._total += 1
        elif held[0] != entry[0]:  # the same name as a counter and a gauge: keep the first
            v.dropped += entry[1]
        else:
            merge(held, entry)

    def models(self) -> list[str]:
        return sorted(self._models)

    def drain(self, model: str) -> dict[str, dict[str, Any]]:
        """version -> VersionMetrics fields, since the previous drain; starts afresh."""
        versions = self._models.pop(model, {})
        self._total -= sum(len(v.metrics) for v in versions.values())
        return {version: v.report() for version, v in versions.items()}


def chunks(entries: list[tuple[str, Entry]]) -> Iterator[list[tuple[str, Entry]]]:
    for i in range(0, len(entries), MAX_METRICS_PER_DATAGRAM):
        yield entries[i : i + MAX_METRICS_PER_DATAGRAM]
