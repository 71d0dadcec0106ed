"""The Prometheus view of the fleet, built at scrape time from the telemetry database.

Per device (labels `device`, `group`): online, last seen, CPU, memory, disk, GPU load,
temperatures (`sensor`), power rails (`rail`); per model (`device`, `group`, `model`,
`version`): live inference latency quantiles; the ingester's own counters; and, when the
controller database has a `rollouts` table, rollouts by state (read-only); and drifted
devices per group and model against the releases this controller signed.

A custom collector rather than registered Gauges: it reads the newest sample of each
device from SQLite at scrape time (shared by every `jetfleet serve` on that database),
so a device that went away disappears instead of freezing at its last value.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from controller.drift import DeviceView, device_drift, released, rollouts_in_flight, summarize
from controller.ingest import DROP_REASONS, IngestStats
from controller.telemetry_store import TelemetryStore
from protocol.errors import ProtocolError
from protocol.messages import DeviceStatus

log = structlog.get_logger(__name__)

# Without a retained status, a device counts as online while its samples keep coming.
STALE_AFTER_S = 60.0


def _group_label(status: DeviceStatus | None) -> str:
    return ",".join(sorted(status.groups)) if status and status.groups else ""


class FleetCollector(Collector):
    def __init__(
        self,
        telemetry_db: Path,
        *,
        stats: Callable[[], IngestStats] | None = None,
        status: Callable[[], dict[str, DeviceStatus]] | None = None,
        controller_db: Path | None = None,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.telemetry_db = Path(telemetry_db)
        self.stats = stats
        self.status = status or dict
        self.controller_db = Path(controller_db) if controller_db else None
        self.stale_after_s = stale_after_s
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._fleet()
        yield from self._ingest()
        yield from self._rollouts()
        yield from self._drift()

    def _fleet(self) -> Iterator[Metric]:
        dl = ["device", "group"]
        online = GaugeMetricFamily("jetfleet_device_online", "1 if the device is online", labels=dl)
        seen = GaugeMetricFamily(
            "jetfleet_device_last_seen_timestamp_seconds",
            "time of the device's newest telemetry sample",
            labels=dl,
        )
        up = GaugeMetricFamily("jetfleet_device_uptime_seconds", "agent uptime", labels=dl)
        cpu = GaugeMetricFamily(
            "jetfleet_device_cpu_utilization_ratio", "mean CPU load, 0-1", labels=dl
        )
        mem = GaugeMetricFamily("jetfleet_device_memory_used_bytes", "memory in use", labels=dl)
        memt = GaugeMetricFamily("jetfleet_device_memory_total_bytes", "memory", labels=dl)
        disk = GaugeMetricFamily(
            "jetfleet_device_disk_free_bytes", "free space of the data directory", labels=dl
        )
        gpu = GaugeMetricFamily("jetfleet_device_gpu_load_ratio", "GPU load, 0-1", labels=dl)
        freq = GaugeMetricFamily("jetfleet_device_gpu_frequency_hertz", "GPU clock", labels=dl)
        temp = GaugeMetricFamily(
            "jetfleet_device_temperature_celsius", "temperature", labels=[*dl, "sensor"]
        )
        power = GaugeMetricFamily(
            "jetfleet_device_power_watts", "power per rail", labels=[*dl, "rail"]
        )
        lat = GaugeMetricFamily(
            "jetfleet_model_latency_seconds",
            "live inference latency of the active engine",
            labels=[*dl, "model", "version", "quantile"],
        )
        count = GaugeMetricFamily(
            "jetfleet_model_inferences_window",
            "inferences in the live latency window",
            labels=[*dl, "model", "version"],
        )
        jobs = GaugeMetricFamily(
            "jetfleet_device_jobs", "jobs the agent finished, by result", labels=[*dl, "result"]
        )
        statuses = self.status()
        now = self.clock()
        try:
            store = TelemetryStore(self.telemetry_db, readonly=True)
            try:
                latest = store.latest()
            finally:
                store.close()
        except Exception as e:  # a scrape must answer even when the database is not there
            log.warning("metrics_db_unreadable", reason=str(e))
            latest = []
        seen_ids: set[str] = set()
        for row in latest:
            try:
                s = row.sample()
            except ProtocolError as e:
                log.warning("metrics_sample_unreadable", device=row.device_id, reason=e.reason)
                continue
            st = statuses.get(s.device_id)
            labels = [s.device_id, _group_label(st)]
            seen_ids.add(s.device_id)
            fresh = now - row.received < self.stale_after_s
            online.add_metric(labels, 1.0 if (st.online if st is not None else fresh) else 0.0)
            seen.add_metric(labels, row.ts)
            up.add_metric(labels, s.uptime_s)
            if s.cpu.mean_percent is not None:
                cpu.add_metric(labels, s.cpu.mean_percent / 100.0)
            if s.mem is not None:
                mem.add_metric(labels, float(s.mem.used))
                memt.add_metric(labels, float(s.mem.total))
            if s.disk_free_bytes is not None:
                disk.add_metric(labels, float(s.disk_free_bytes))
            temps = dict(s.temps)
            if s.gpu is not None:
                if s.gpu.load_pct is not None:
                    gpu.add_metric(labels, s.gpu.load_pct / 100.0)
                if s.gpu.freq_mhz is not None:
                    freq.add_metric(labels, s.gpu.freq_mhz * 1e6)
                if s.gpu.temp_c is not None:
                    temps.setdefault("gpu", s.gpu.temp_c)
                for rail, mw in sorted(s.gpu.power_mw.items()):
                    power.add_metric([*labels, rail], mw / 1000.0)
            for sensor, c in sorted(temps.items()):
                temp.add_metric([*labels, sensor], c)
            for name, m in sorted(s.models.items()):
                version = m.version or ""
                for q, v in (("0.5", m.p50_ms), ("0.99", m.p99_ms)):
                    if v is not None:
                        lat.add_metric([*labels, name, version, q], v / 1000.0)
                count.add_metric([*labels, name, version], float(m.count))
            jobs.add_metric([*labels, "done"], float(s.jobs.done))
            jobs.add_metric([*labels, "failed"], float(s.jobs.failed))
        # Devices known only from their retained status (e.g. offline before any sample).
        for device_id, st in sorted(statuses.items()):
            if device_id not in seen_ids:
                online.add_metric([device_id, _group_label(st)], 1.0 if st.online else 0.0)
        yield from (online, seen, up, cpu, mem, memt, disk, gpu, freq, temp, power, lat, count)
        yield jobs

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

    def _rollouts(self) -> Iterator[Metric]:
        db = self.controller_db
        if db is None or not db.is_file():
            return
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.Error as e:
            log.warning("metrics_controller_db_unreadable", reason=str(e))
            return
        try:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(rollouts)")}
            state_col = next((c for c in ("state", "status") if c in cols), None)
            if state_col is None:
                return
            g = GaugeMetricFamily(
                "jetfleet_rollouts",
                "rollouts in the controller database, by state",
                labels=["state"],
            )
            for state, n in conn.execute(
                f"SELECT {state_col}, COUNT(*) FROM rollouts GROUP BY {state_col}"
            ):
                g.add_metric([str(state)], float(n))
            yield g
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if "assignments" in tables:
                a_cols = {r[1] for r in conn.execute("PRAGMA table_info(assignments)")}
                if "state" in a_cols:
                    d = GaugeMetricFamily(
                        "jetfleet_rollout_devices",
                        "device assignments of all rollouts, by job state",
                        labels=["state"],
                    )
                    for state, n in conn.execute(
                        "SELECT state, COUNT(*) FROM assignments GROUP BY state"
                    ):
                        d.add_metric([str(state)], float(n))
                    yield d
        except sqlite3.Error as e:
            log.warning("metrics_rollouts_unreadable", reason=str(e))
        finally:
            conn.close()

    def _drift(self) -> Iterator[Metric]:
        """Drifted devices per group and model (controller/drift.py): the devices' last
        statuses against the releases and pins this controller signed; 0 for a released
        model no device drifts on, so an alert can tell none from unknown."""
        db = self.controller_db
        if db is None or not db.is_file():
            return
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.Error as e:
            log.warning("metrics_controller_db_unreadable", reason=str(e))
            return
        try:
            groups, pins = released(conn)
            held = rollouts_in_flight(conn)
        except sqlite3.Error as e:
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


def make_registry(collector: FleetCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
