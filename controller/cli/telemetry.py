"""`jetfleet telemetry watch|export|plot`: the fleet live, and its history for people and tools.

watch   subscribes to retained status and live telemetry (a plain subscription: it does
        not take samples away from `jetfleet serve`'s shared one) and redraws a table.
export  reads the telemetry database that `jetfleet serve` writes (csv or jsonl).
plot    draws one metric of one device over time to a PNG (matplotlib, Agg).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from controller.cli.common import (
    EXIT_FAILED,
    Output,
    OutputOption,
    configure_cli_logging,
    fail,
    print_json,
    require_extra,
    settings,
)
from controller.fleet.access import mqtt_options
from controller.mqtt import ControllerMqtt, MqttError
from controller.telemetry.plotdata import (
    LATENCY,
    VersionChange,
    byte_scale,
    latency_by_version,
    split_at_gaps,
    version_changes,
)
from controller.telemetry.store import (
    METRIC_HELP,
    METRICS,
    TelemetryStore,
    TelemetryStoreError,
    default_telemetry_db,
)
from protocol.errors import ProtocolError
from protocol.fsio import atomic_file
from protocol.ids import validate_id
from protocol.messages import DeviceStatus
from protocol.telemetry import TelemetrySample
from protocol.topics import Topics
from protocol.transport import TransportConfigError

app = typer.Typer(
    help="Fleet telemetry: a live view, exports and plots.",
    no_args_is_help=True,
)

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ExportFormat(str, Enum):
    csv = "csv"
    jsonl = "jsonl"


class Resolution(str, Enum):
    raw = "raw"
    minute = "minute"


def parse_time(text: str, now: float | None = None) -> float:
    """`90s`, `30m`, `1h`, `2d`, `1w` ago, or an ISO 8601 time (UTC when no offset)."""
    now = time.time() if now is None else now
    m = _DURATION_RE.match(text.strip().lower())
    if m:
        return now - float(m[1]) * _UNIT_S[m[2]]
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration like 30m, 1h, 2d nor an ISO 8601 time"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _telemetry_db(ctx: typer.Context, override: str | None) -> str | Path:
    return override or default_telemetry_db(settings(ctx).db_target())


def _open_store(path: str | Path) -> TelemetryStore:
    try:
        return TelemetryStore(path, readonly=True)
    except TelemetryStoreError as e:
        fail(str(e), EXIT_FAILED)


TelemetryDbOption = typer.Option(
    None,
    "--telemetry-db",
    help="telemetry database: a file or postgresql://… [default: telemetry.db next to a "
    "SQLite --db; PostgreSQL: the --db database]",
)


# -- watch ---------------------------------------------------------------------------


class FleetView:
    """Retained status + newest telemetry per device, fed from paho's network thread."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self.status: dict[str, DeviceStatus] = {}
        self.samples: dict[str, tuple[TelemetrySample, float]] = {}
        self.ignored = 0

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            channel = self.topics.parse(topic).channel
            if channel == "status" and payload:
                st = DeviceStatus.decode(payload)
                with self._lock:
                    self.status[st.device_id] = st
            elif channel == "telemetry":
                s = TelemetrySample.decode(payload)
                with self._lock:
                    self.samples[s.device_id] = (s, time.time())
        except ProtocolError:
            self.ignored += 1  # the ingester logs bad samples; the view just skips them

    def rows(self, group: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        with self._lock:
            ids = sorted(set(self.status) | set(self.samples))
            status, samples = dict(self.status), dict(self.samples)
        out = []
        for d in ids:
            st = status.get(d)
            if group and (st is None or group not in st.groups):
                continue
            s, received = samples.get(d, (None, None))
            temps = dict(s.temps) if s else {}
            if s and s.gpu and s.gpu.temp_c is not None:
                temps["gpu"] = s.gpu.temp_c
            power = s.gpu.input_power_mw if s and s.gpu else None
            p99 = {n: m.p99_ms for n, m in s.models.items() if m.p99_ms is not None} if s else {}
            versions = {n: m.active for n, m in st.models.items() if m.active} if st else {}
            if not versions and s:
                versions = {n: m.version for n, m in s.models.items() if m.version}
            out.append(
                {
                    "device": d,
                    "online": st.online if st else (received is not None and now - received < 60),
                    "groups": st.groups if st else [],
                    "cpu_pct": s.cpu.mean_percent if s else None,
                    "temp_max_c": max(temps.values()) if temps else None,
                    "gpu_load_pct": s.gpu.load_pct if s and s.gpu else None,
                    "power_w": power / 1000.0 if power is not None else None,
                    "versions": versions,
                    "p99_ms": p99,
                    "age_s": now - received if received is not None else None,
                }
            )
        return out

    def table(self, group: str | None = None) -> Table:
        t = Table(title=f"jetfleet fleet{f' (group {group})' if group else ''}", expand=False)
        for col in ("device", "online", "cpu", "temp", "gpu", "power", "active", "p99", "seen"):
            t.add_column(col, justify="right" if col in ("cpu", "temp", "gpu", "power") else "left")

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else fmt.format(v)

        for r in self.rows(group):
            hot = r["temp_max_c"] is not None and r["temp_max_c"] >= 80
            t.add_row(
                r["device"],
                "[green]yes[/]" if r["online"] else "[red]no[/]",
                num(r["cpu_pct"], "{:.0f}%"),
                ("[red]" if hot else "") + num(r["temp_max_c"], "{:.1f}°C"),
                num(r["gpu_load_pct"], "{:.0f}%"),
                num(r["power_w"], "{:.1f} W"),
                ", ".join(f"{n} {v}" for n, v in sorted(r["versions"].items())) or "-",
                ", ".join(f"{n} {v:.1f}ms" for n, v in sorted(r["p99_ms"].items())) or "-",
                "-" if r["age_s"] is None else f"{r['age_s']:.0f}s ago",
            )
        return t


@app.command()
def watch(
    ctx: typer.Context,
    group: str | None = typer.Option(None, "--group", help="only devices in this group"),
    interval: float = typer.Option(1.0, "--interval", help="seconds between redraws"),
    once: bool = typer.Option(False, "--once", help="print one snapshot after --wait and exit"),
    wait: float = typer.Option(3.0, "--wait", help="with --once: seconds to collect samples"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for the broker"),
    output: Output = OutputOption,
) -> None:
    """A live table of the fleet: online, temperatures, GPU load, power, versions, p99."""
    configure_cli_logging()
    s = settings(ctx)
    if group:
        try:
            validate_id(group, "group name")
        except ProtocolError as e:
            fail(e.reason)
    topics = Topics(s.prefix)
    view = FleetView(topics)
    try:
        client = ControllerMqtt(mqtt_options(s), view.on_message)
    except TransportConfigError as e:
        fail(f"TLS settings: {e.reason}")
    try:
        client.connect(timeout=timeout)
        client.subscribe([topics.all_status(), topics.all_telemetry()], timeout=timeout)
    except MqttError as e:
        fail(str(e), EXIT_FAILED)
    try:
        if once or output == Output.json:
            time.sleep(wait)
            if output == Output.json:
                print_json(view.rows(group))
            else:
                Console().print(view.table(group))
            return
        with Live(view.table(group), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(view.table(group))
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


# -- export --------------------------------------------------------------------------


def _rows(
    store: TelemetryStore, device: str, since: float, until: float | None, res: Resolution
) -> Iterator[dict[str, Any]]:
    if res == Resolution.raw:
        return store.raw_rows(device, since, until)
    return store.minute_rows(device, since, until)


def write_export(
    rows: Iterator[dict[str, Any]], fmt: ExportFormat, res: Resolution, out: TextIO
) -> int:
    n = 0
    if fmt == ExportFormat.jsonl:
        for r in rows:
            if res == Resolution.raw:
                out.write(r["payload"] + "\n")  # the sample exactly as the device sent it
            else:
                out.write(json.dumps({**r, "time": _iso(r["ts"])}, separators=(",", ":")) + "\n")
            n += 1
        return n
    cols = ["time", "ts", "device_id", *(["n"] if res == Resolution.minute else []), *METRICS]
    w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "time": _iso(r["ts"])})
        n += 1
    return n


def _known_device(store: TelemetryStore, device: str) -> None:
    """A device that never sent telemetry here is most likely a typo: an error (exit 2),
    not an empty export."""
    known = store.devices()
    if device not in known:
        shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        store.close()
        fail(
            f"no telemetry was ever received from {device!r} (devices with telemetry: "
            f"{shown or 'none'})"
        )


@app.command()
def export(
    ctx: typer.Context,
    device: str = typer.Option(..., "--device", help="device id"),
    since: str = typer.Option("1h", "--since", help="30m, 1h, 2d ... or an ISO 8601 time"),
    until: str | None = typer.Option(None, "--until", help="same forms as --since [now]"),
    fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", help="csv or jsonl"),
    resolution: Resolution = typer.Option(
        Resolution.raw, "--resolution", help="raw samples (24 h kept) or 1-minute means (30 d)"
    ),
    out: Path | None = typer.Option(None, "--out", help="file to write [stdout]"),
    telemetry_db: str | None = TelemetryDbOption,
) -> None:
    """Samples of one device as CSV (one row per sample) or JSON Lines (the samples)."""
    try:
        validate_id(device)
        t0, t1 = parse_time(since), parse_time(until) if until else None
    except (ProtocolError, ValueError) as e:
        fail(e.reason if isinstance(e, ProtocolError) else str(e))
    store = _open_store(_telemetry_db(ctx, telemetry_db))
    try:
        _known_device(store, device)
        rows = _rows(store, device, t0, t1, resolution)
        if out is None:
            n = write_export(rows, fmt, resolution, sys.stdout)
        else:
            with atomic_file(out) as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                n = write_export(rows, fmt, resolution, text)
                text.flush()
                text.detach()  # atomic_file fsyncs and closes the file itself
    finally:
        store.close()
    if n == 0:
        typer.echo(f"jetfleet: no telemetry for {device} since {_iso(t0)}", err=True)


# -- plot ----------------------------------------------------------------------------


@app.command()
def plot(
    ctx: typer.Context,
    device: str = typer.Option(..., "--device", help="device id"),
    metric: str = typer.Option(
        ...,
        "--metric",
        help=f"{LATENCY} (p50/p99 per model version) or one of: {', '.join(METRICS)}",
    ),
    out: Path = typer.Option(..., "--out", help="PNG file to write"),
    since: str = typer.Option("1h", "--since", help="30m, 1h, 2d ... or an ISO 8601 time"),
    until: str | None = typer.Option(None, "--until", help="same forms as --since [now]"),
    telemetry_db: str | None = TelemetryDbOption,
) -> None:
    """One metric of one device over time, to a PNG: the line breaks where the robot was
    offline, dotted lines mark version changes, bytes are in MiB or GiB."""
    require_extra("matplotlib", "telemetry plot")
    if metric not in METRICS and metric != LATENCY:
        fail(f"unknown metric {metric!r}; choose one of: {LATENCY}, {', '.join(METRICS)}")
    try:
        validate_id(device)
        t0, t1 = parse_time(since), parse_time(until) if until else None
    except (ProtocolError, ValueError) as e:
        fail(e.reason if isinstance(e, ProtocolError) else str(e))
    store = _open_store(_telemetry_db(ctx, telemetry_db))
    try:
        raw = list(store.raw_rows(device, t0, t1))
        if metric == LATENCY:
            series = {
                f"{label} {key[:3]}": pts
                for label, by_key in latency_by_version(raw).items()
                for key, pts in by_key.items()
            }
        else:
            series = {metric: store.series(device, metric, t0, t1)}
    finally:
        store.close()
    points = sum(len(p) for p in series.values())
    if not points:
        fail(f"no {metric} data for {device} since {_iso(t0)}", EXIT_FAILED)
    changes = version_changes(raw)
    gaps = _draw(out, f"{device}: {metric}", metric, series, changes)
    typer.echo(f"{out}: {points} points of {metric} for {device}{_notes(gaps, changes)}", err=True)


def _notes(gaps: list[tuple[float, float]], changes: list[VersionChange]) -> str:
    def hm(ts: float) -> str:
        return f"{datetime.fromtimestamp(ts, timezone.utc):%H:%M}"

    notes = [f"offline {hm(a)}-{hm(b)}" for a, b in gaps]
    notes += [f"{c.model} {c.before or '-'} -> {c.after or '-'} at {hm(c.ts)}" for c in changes]
    return f"; {'; '.join(notes)}" if notes else ""


def _draw(
    out: Path,
    title: str,
    metric: str,
    series: dict[str, list[tuple[float, float]]],
    changes: list[VersionChange],
) -> list[tuple[float, float]]:
    """Write the PNG; the gaps it left (where the robot was offline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def when(ts: float) -> Any:
        return datetime.fromtimestamp(ts, timezone.utc)

    scale, unit = byte_scale(metric, (v for pts in series.values() for _, v in pts))
    label = "latency, ms" if metric == LATENCY else METRIC_HELP[metric]
    if unit:
        label = label.replace("bytes", unit)
    gaps: list[tuple[float, float]] = []
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    try:
        for i, (name, pts) in enumerate(sorted(series.items())):
            runs, run_gaps = split_at_gaps(pts)
            gaps = gaps or run_gaps
            color = f"C{i % 10}"
            for j, run in enumerate(runs):
                ax.plot(
                    [when(t) for t, _ in run],
                    [v / scale for _, v in run],
                    linewidth=1.2,
                    color=color,
                    linestyle="--" if name.endswith(" p50") else "-",
                    marker="." if len(pts) < 60 else None,
                    label=name if j == 0 and len(series) > 1 else None,
                )
        for a, b in gaps:
            ax.axvspan(when(a), when(b), color="grey", alpha=0.15, label=None)
        for c in changes:
            ax.axvline(when(c.ts), color="black", linestyle=":", linewidth=1)
            ax.annotate(
                f"{c.model} {c.after or '-'}",
                (when(c.ts), 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=8,
                rotation=90,
                va="top",
                ha="right",
            )
        ax.set_title(title)
        ax.set_ylabel(label)
        ax.set_xlabel("time (UTC); grey: offline")
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
        fig.autofmt_xdate()
        fig.tight_layout()
        with atomic_file(out) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return gaps
