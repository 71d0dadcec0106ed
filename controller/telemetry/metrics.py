"""The Prometheus view of the fleet, built at scrape time from the telemetry database.

Per device (labels `device`, `group`): online, last seen, CPU, memory, disk, GPU load,
temperatures (`sensor`), power rails (`rail`); per model (`device`, `group`, `model`,
`version`): live inference latency quantiles; the ingester's own counters; and, when the
controller database has a `rollouts` table, rollouts by state and the SLO verdicts of
the last day's bakes (read-only); and drifted devices per group and model against the
releases this controller signed.

A custom collector rather than registered Gauges: it reads the newest sample of each
device from SQLite at scrape time (shared by every `jetfleet serve` on that database),
so a device that went away disappears instead of freezing at its last value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from controller.db import DB_ERRORS, Database, DatabaseError, is_url, open_database
from controller.desired.drift import DeviceView, device_drift, released, summarize
from controller.rollouts.slo import VERDICTS
from controller.rollouts.store import rollout_state_counts, rollouts_in_flight, slo_verdict_rows
from controller.telemetry.ingest import DROP_REASONS, IngestStats
from controller.telemetry.store import LatestSample, TelemetryStore
from protocol.errors import ProtocolError
from protocol.messages import DeviceStatus
from protocol.telemetry import GpuStats, TelemetrySample

log = structlog.get_logger(__name__)

# Without a retained status, a device counts as online while its samples keep coming.
STALE_AFTER_S = 60.0


def _group_label(status: DeviceStatus | None) -> str:
    return ",".join(sorted(status.groups)) if status and status.groups else ""


class _FleetFamilies:
    """The per-device and per-model metric families of one scrape."""

    def __init__(self) -> None:
        dl = ["device", "group"]
        g = GaugeMetricFamily
        self.online = g("jetfleet_device_online", "1 if the device is online", labels=dl)
        self.seen = g(
            "jetfleet_device_last_seen_timestamp_seconds",
            "time of the device's newest telemetry sample",
            labels=dl,
        )
        self.up = g("jetfleet_device_uptime_seconds", "agent uptime", labels=dl)
        self.cpu = g("jetfleet_device_cpu_utilization_ratio", "mean CPU load, 0-1", labels=dl)
        self.mem = g("jetfleet_device_memory_used_bytes", "memory in use", labels=dl)
        self.memt = g("jetfleet_device_memory_total_bytes", "memory", labels=dl)
        self.disk = g(
            "jetfleet_device_disk_free_bytes", "free space of the data directory", labels=dl
        )
        self.gpu = g("jetfleet_device_gpu_load_ratio", "GPU load, 0-1", labels=dl)
        self.freq = g("jetfleet_device_gpu_frequency_hertz", "GPU clock", labels=dl)
        self.temp = g("jetfleet_device_temperature_celsius", "temperature", labels=[*dl, "sensor"])
        self.power = g("jetfleet_device_power_watts", "power per rail", labels=[*dl, "rail"])
        self.lat = g(
            "jetfleet_model_latency_seconds",
            "live inference latency of the active engine",
            labels=[*dl, "model", "version", "quantile"],
        )
        self.count = g(
            "jetfleet_model_inferences_window",
            "inferences in the live latency window",
            labels=[*dl, "model", "version"],
        )
        self.jobs = g(
            "jetfleet_device_jobs", "jobs the agent finished, by result", labels=[*dl, "result"]
        )

    def all(self) -> tuple[Metric, ...]:
        return (
            *(self.online, self.seen, self.up, self.cpu, self.mem, self.memt, self.disk),
            *(self.gpu, self.freq, self.temp, self.power, self.lat, self.count, self.jobs),
        )

    def add_sample(self, labels: list[str], ts: float, s: TelemetrySample, online: bool) -> None:
        self.online.add_metric(labels, 1.0 if online else 0.0)
        self.seen.add_metric(labels, ts)
        self.up.add_metric(labels, s.uptime_s)
        if s.cpu.mean_percent is not None:
            self.cpu.add_metric(labels, s.cpu.mean_percent / 100.0)
        if s.mem is not None:
            self.mem.add_metric(labels, float(s.mem.used))
            self.memt.add_metric(labels, float(s.mem.total))
        if s.disk_free_bytes is not None:
            self.disk.add_metric(labels, float(s.disk_free_bytes))
        temps = dict(s.temps)
        if s.gpu is not None:
            self._add_gpu(labels, s.gpu, temps)
        for sensor, c in sorted(temps.items()):
            self.temp.add_metric([*labels, sensor], c)
        for name, m in sorted(s.models.items()):
            version = m.version or ""
            for q, v in (("0.5", m.p50_ms), ("0.99", m.p99_ms)):
                if v is not None:
                    self.lat.add_metric([*labels, name, version, q], v / 1000.0)
            self.count.add_metric([*labels, name, version], float(m.count))
        self.jobs.add_metric([*labels, "done"], float(s.jobs.done))
        self.jobs.add_metric([*labels, "failed"], float(s.jobs.failed))

    def _add_gpu(self, labels: list[str], gpu: GpuStats, temps: dict[str, float]) -> None:
        if gpu.load_pct is not None:
            self.gpu.add_metric(labels, gpu.load_pct / 100.0)
        if gpu.freq_mhz is not None:
            self.freq.add_metric(labels, gpu.freq_mhz * 1e6)
        if gpu.temp_c is not None:
            temps.setdefault("gpu", gpu.temp_c)
        for rail, mw in sorted(gpu.power_mw.items()):
            self.power.add_metric([*labels, rail], mw / 1000.0)


class FleetCollector(Collector):
    def __init__(
        self,
        telemetry_db: str | Path,
        *,
        stats: Callable[[], IngestStats] | None = None,
        status: Callable[[], dict[str, DeviceStatus]] | None = None,
        controller_db: str | Path | None = None,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.telemetry_db = telemetry_db
        self.stats = stats
        self.status = status or dict
        self.controller_db = controller_db or None
        self.stale_after_s = stale_after_s
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._fleet()
        yield from self._ingest()
        yield from self._rollouts()
        yield from self._drift()

    def _fleet(self) -> Iterator[Metric]:
        f = _FleetFamilies()
        statuses = self.status()
        now = self.clock()
        seen_ids: set[str] = set()
        for row in self._latest_rows():
            try:
                s = row.sample()
            except ProtocolError as e:
                log.warning("metrics_sample_unreadable", device=row.device_id, reason=e.reason)
                continue
            st = statuses.get(s.device_id)
            seen_ids.add(s.device_id)
            fresh = now - row.received < self.stale_after_s
            online = st.online if st is not None else fresh
            f.add_sample([s.device_id, _group_label(st)], row.ts, s, online)
        # Devices known only from their retained status (e.g. offline before any sample).
        for device_id, st in sorted(statuses.items()):
            if device_id not in seen_ids:
                f.online.add_metric([device_id, _group_label(st)], 1.0 if st.online else 0.0)
        yield from f.all()

    def _latest_rows(self) -> list[LatestSample]:
        try:
            store = TelemetryStore(self.telemetry_db, readonly=True)
            try:
                return store.latest()
            finally:
                store.close()
        except Exception as e:  # a scrape must answer even when the database is not there
            log.warning("metrics_db_unreadable", reason=str(e))
            return []

    def _ingest(self) -> Iterator[Metric]:
        if self.stats is None:
            return
        s = self.stats()
        received = CounterMetricFamily(
            "jetfleet_telemetry_received", "telemetry messages received by this ingester"
        )
        received.add_metric([], float(s.received))
        stored = CounterMetricFamily(
            "jetfleet_telemetry_samples", "telemetry samples stored in the database"
        )
        stored.add_metric([], float(s.stored))
        dropped = CounterMetricFamily(
            "jetfleet_telemetry_dropped",
            "telemetry samples dropped, by reason",
            labels=["reason"],
        )
        for reason in sorted(set(DROP_REASONS) | set(s.dropped)):
            dropped.add_metric([reason], float(s.dropped.get(reason, 0)))
        yield from (received, stored, dropped)

    def _controller_conn(self) -> Database | None:
        """The controller database, read-only; None when there is none (yet)."""
        db = self.controller_db
        if db is None or (not is_url(db) and not Path(db).is_file()):
            return None
        try:
            return open_database(db, readonly=True, timeout=2.0)
        except DatabaseError as e:
            log.warning("metrics_controller_db_unreadable", reason=e.reason)
            return None

    def _rollouts(self) -> Iterator[Metric]:
        conn = self._controller_conn()
        if conn is None:
            return
        try:
            counts = rollout_state_counts(conn)
            if counts is None:
                return
            by_rollout, by_assignment = counts
            g = GaugeMetricFamily(
                "jetfleet_rollouts",
                "rollouts in the controller database, by state",
                labels=["state"],
            )
            for state, n in by_rollout.items():
                g.add_metric([state], float(n))
            yield g
            if by_assignment is not None:
                d = GaugeMetricFamily(
                    "jetfleet_rollout_devices",
                    "device assignments of all rollouts, by job state",
                    labels=["state"],
                )
                for state, n in by_assignment.items():
                    d.add_metric([state], float(n))
                yield d
            yield from _slo_gauges(slo_verdict_rows(conn, since=self.clock() - SLO_SHOWN_S))
        except DB_ERRORS as e:
            log.warning("metrics_rollouts_unreadable", reason=str(e))
        finally:
            conn.close()

    def _drift(self) -> Iterator[Metric]:
        """Drifted devices per group and model (controller/desired/drift.py): the devices' last
        statuses against the releases and pins this controller signed; 0 for a released
        model no device drifts on, so an alert can tell none from unknown."""
        conn = self._controller_conn()
        if conn is None:
            return
        try:
            groups, pins = released(conn)
            held = rollouts_in_flight(conn)
        except DB_ERRORS as e:
            log.warning("metrics_releases_unreadable", reason=str(e))
            return
        finally:
            conn.close()
        drifts = []
        for status in self.status().values():
            mine = {m: rid for (dev, m), rid in held.items() if dev == status.device_id}
            view = status_view(status)
            drifts += device_drift(view, groups, pins.get(status.device_id, {}), mine)
        counts = {(g, m): 0 for g, models in groups.items() for m in models}
        counts.update(summarize(drifts))
        g = GaugeMetricFamily(
            "jetfleet_drifted_devices",
            "devices not on their desired version of a model, per group",
            labels=["group", "model"],
        )
        for (group, model), n in sorted(counts.items()):
            g.add_metric([group, model], float(n))
        yield g


def status_view(status: DeviceStatus) -> DeviceView:
    job = status.job
    return DeviceView(
        id=status.device_id,
        groups=list(status.groups),
        online=status.online,
        last_seen=status.at.timestamp(),
        active={n: slot.active for n, slot in status.models.items() if slot.active},
        job_model=job.model if job else None,
        job_state=job.state.value if job else None,
        desired=status.desired,
    )


# SLO verdicts stay visible this long after their last judgement (a day of rollouts).
SLO_SHOWN_S = 24 * 3600.0


def _slo_gauges(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """The latest wave's verdict of each SLO of each rollout judged lately: the verdict as
    a state set, and the relative change with its interval where the SLO is relative."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:  # ordered by wave: the last one wins
        latest[(r["rollout_id"], r["slo"])] = r
    labels = ["rollout", "slo", "wave"]  # in the order the exposition prints them
    verdict = GaugeMetricFamily(
        "jetfleet_rollout_slo_verdict",
        "1 for the SLO's latest verdict in its rollout (PASS, FAIL, NOT_ENOUGH_DATA), else 0",
        labels=["rollout", "slo", "verdict", "wave"],
    )
    figures = {
        key: GaugeMetricFamily(f"jetfleet_rollout_slo_{key}_ratio", text, labels=labels)
        for key, text in (
            ("change", "the canary's relative change against the baseline (-0.1: 10% lower)"),
            ("low", "lower bound of the change's confidence interval"),
            ("high", "upper bound of the change's confidence interval"),
        )
    }
    for (rid, slo), r in sorted(latest.items()):
        wave = str(r["wave"] + 1)
        values = [rid, slo, wave]
        for v in VERDICTS:
            verdict.add_metric([rid, slo, v, wave], 1.0 if r["verdict"] == v else 0.0)
        if r.get("change") is not None:
            for key, g in figures.items():
                if r.get(key) is not None:
                    g.add_metric(values, float(r[key]))
    yield verdict
    yield from figures.values()


def make_registry(collector: FleetCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
