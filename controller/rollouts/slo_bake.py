"""Where a bake's SLO figures come from: telemetry samples of the two cohorts (I/O).

`TelemetrySource` reads the controller's telemetry database (`jetfleet serve` ingests
the devices' telemetry into it); anything with the same `samples` method can stand in
(another store, another metrics system). `judge_wave` turns the samples of each cohort's
windows into per-device values of each SLO and asks controller/rollouts/slo.py for the verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from controller.rollouts.slo import Slo, Verdict, judge, parse_slo
from controller.telemetry.store import TelemetryStore, TelemetryStoreError
from protocol.errors import ProtocolError
from protocol.telemetry import TelemetrySample

log = structlog.get_logger("jetfleet.controller.slo")


class SampleSource(Protocol):
    def samples(self, device_id: str, since: float, until: float) -> list[TelemetrySample]: ...


class TelemetrySource:
    """The telemetry database, opened read-only on first use (it may not exist before
    `jetfleet serve` has received a sample: that is no data, not an error)."""

    def __init__(self, path: str | Path) -> None:
        self.path = path  # a SQLite file or a postgresql:// URL
        self._store: TelemetryStore | None = None

    def samples(self, device_id: str, since: float, until: float) -> list[TelemetrySample]:
        if self._store is None:
            try:
                self._store = TelemetryStore(self.path, readonly=True)
            except TelemetryStoreError as e:
                log.warning("slo_no_telemetry", reason=str(e))
                return []
        out = []
        for row in self._store.raw_rows(device_id, since, until):
            try:
                out.append(TelemetrySample.decode(row["payload"]))
            except ProtocolError:
                continue  # stored as received; one bad sample is no figure
        return out

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


@dataclass(frozen=True)
class Window:
    """One device's samples for one version of the model over [since, until)."""

    device_id: str
    version: str
    since: float
    until: float


@dataclass(frozen=True)
class BakeWindows:
    """The windows a bake reads: the canary devices now (new version) and before their
    switch (old version); the baseline devices (still on the old version) over the same
    two periods. No baseline devices: the canary is judged against its own past."""

    canary: Sequence[Window]
    canary_before: Sequence[Window]
    baseline: Sequence[Window] = ()
    baseline_before: Sequence[Window] = ()


def judge_wave(
    source: SampleSource, slos: Sequence[str], model: str, w: BakeWindows
) -> list[Verdict]:
    """Each SLO's verdict for one bake."""
    every = (*w.canary, *w.canary_before, *w.baseline, *w.baseline_before)
    fetched = {x: source.samples(x.device_id, x.since, x.until) for x in every}
    verdicts = []
    for expr in slos:
        slo = parse_slo(expr)
        before = _values(slo, model, w.canary_before, fetched)
        if w.baseline:
            verdict = judge(
                slo,
                _values(slo, model, w.canary, fetched),
                _values(slo, model, w.baseline, fetched),
                canary_before=before,
                baseline_before=_values(slo, model, w.baseline_before, fetched),
            )
        else:
            now = _values(slo, model, w.canary, fetched)
            verdict = judge(slo, now, before, canary_before=before, paired=True)
        verdicts.append(verdict)
    return verdicts


def _values(
    slo: Slo, model: str, windows: Sequence[Window], fetched: dict[Window, list[TelemetrySample]]
) -> dict[str, list[float]]:
    """device → the SLO's metric in each of its samples that concern its window's version."""
    out: dict[str, list[float]] = {}
    for w in windows:
        vals = [slo.value(s, model, w.version) for s in fetched[w]]
        out.setdefault(w.device_id, []).extend(v for v in vals if v is not None)
    return out
