"""`jetfleet devices [--group G] [--drift] [--output json]`: the fleet, from retained status.

`--drift` lists the robots not on their desired versions and why (controller/desired/drift.py):
the desired state is read from the releases and pins the broker holds now (or, with the
broker unreachable, the ones this controller last signed).

A device whose clock is off by more than a minute is flagged: every signed command it
gets then fails (expired, or issued in the future). The skew is measured from its newest
telemetry sample (its time against when `jetfleet serve` received it, either way), or,
without telemetry, from a status written in the future."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from controller.cli.common import (
    EXIT_FAILED,
    Output,
    OutputOption,
    ago,
    configure_cli_logging,
    fail,
    print_json,
    refresh_registry,
    settings,
)
from controller.db import DB_ERRORS
from controller.desired.drift import DeviceView, Drift, device_drift, released
from controller.desired.releases import ReleaseError, decode, read_retained
from controller.fleet.access import mqtt_options, open_registry
from controller.fleet.registry import DeviceRecord, Registry
from controller.mqtt import MqttError
from controller.rollouts.store import rollouts_in_flight
from controller.settings import ControllerSettings
from controller.telemetry.store import TelemetryStore, TelemetryStoreError, default_telemetry_db
from protocol.errors import ProtocolError
from protocol.ids import validate_id
from protocol.messages import DesiredSummary
from protocol.release import Pins, Release
from protocol.topics import Topics

CLOCK_SKEW_WARN_S = 60.0
TELEMETRY_FRESH_S = 600.0  # an older sample says nothing about the clock now


def _telemetry_times(s: ControllerSettings) -> dict[str, tuple[float, float]]:
    """device -> (its newest sample's time, when serve received it); {} without serve."""
    try:
        store = TelemetryStore(default_telemetry_db(s.db_target()), readonly=True)
    except TelemetryStoreError:
        return {}
    try:
        return {x.device_id: (x.ts, x.received) for x in store.latest()}
    except DB_ERRORS:
        return {}
    finally:
        store.close()


def clock_skews(s: ControllerSettings, records: list[DeviceRecord], now: float) -> dict[str, float]:
    """Device clock minus ours, in seconds, for devices off by more than a minute."""
    times = _telemetry_times(s)
    out: dict[str, float] = {}
    for d in records:
        skew = None
        ts, received = times.get(d.id, (None, None))
        if ts is not None and received is not None and now - received < TELEMETRY_FRESH_S:
            skew = ts - received
        elif d.status_at is not None and d.status_at - now > CLOCK_SKEW_WARN_S:
            skew = d.status_at - now  # at least this much ahead
        if skew is not None and abs(skew) > CLOCK_SKEW_WARN_S:
            out[d.id] = skew
    return out


def _span(seconds: float) -> str:
    s = abs(seconds)
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def skew_text(skew: float) -> str:
    return f"{_span(skew)} {'ahead' if skew > 0 else 'behind'}"


def _models(d: DeviceRecord) -> str:
    parts = []
    for name, slot in sorted(d.models.items()):
        prev = f" (prev {slot['previous']})" if slot.get("previous") else ""
        parts.append(f"{name} {slot.get('active') or '-'}{prev}")
    return "\n".join(parts) or "-"


def _job(d: DeviceRecord) -> str:
    if not d.job:
        return "-"
    what = " ".join(str(x) for x in (d.job.get("model"), d.job.get("version")) if x)
    return f"{d.job.get('state')} {what}".strip()


def _online(online: bool, stale: bool) -> str:
    if stale:
        return f"[yellow]? (was {'yes' if online else 'no'})[/]"
    return "[green]yes[/]" if online else "[red]no[/]"


def devices_table(
    records: list[DeviceRecord], skews: dict[str, float] | None = None, stale: str | None = None
) -> Table:
    """`stale`: why the broker could not be read; the online column is then last known."""
    skews = skews or {}
    title = f"{len(records)} device(s)"
    if stale:
        title += f" [bold red]NOT REFRESHED ({stale}): last known state[/]"
    table = Table(title=title, title_justify="left")
    for col in ("device", "groups", "online", "last seen", "clock", "hardware", "models", "job"):
        table.add_column(col)
    for d in records:
        hw = " / ".join(
            str(v) for v in (d.hardware.get("device_model"), d.hardware.get("backend")) if v
        )
        table.add_row(
            d.id,
            ",".join(d.groups) or "-",
            _online(d.online, stale is not None),
            ago(d.last_seen),
            f"[red]{skew_text(skews[d.id])}[/]" if d.id in skews else "",
            hw or "-",
            _models(d),
            _job(d),
        )
    return table


def desired_documents(
    s: ControllerSettings, registry: Registry, stale: bool
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """group -> model -> version of the releases, device -> its pins: retained on the
    broker, or what this controller last signed when the broker cannot be read."""
    if not stale:
        try:
            groups: dict[str, dict[str, str]] = {}
            pins: dict[str, dict[str, str]] = {}
            options, topics = mqtt_options(s), Topics(s.prefix)
            for filt in (f"{s.prefix}/groups/+/release", f"{s.prefix}/devices/+/pins"):
                for payload in read_retained(options, topics, filt).values():
                    doc = decode(Release, payload) or decode(Pins, payload)
                    versions = {n: m.version for n, m in (doc.models if doc else {}).items()}
                    if isinstance(doc, Release):
                        groups[doc.group] = versions
                    elif isinstance(doc, Pins):
                        pins[doc.device] = versions
            return groups, pins
        except ReleaseError as e:
            typer.echo(f"jetfleet: {e.reason}; drift against the releases signed here", err=True)
    g, p = released(registry.conn)
    return g, {k: dict(v) for k, v in p.items()}


def _view(d: DeviceRecord) -> DeviceView:
    job = d.job or {}
    return DeviceView(
        id=d.id,
        groups=d.groups,
        online=d.online,
        last_seen=d.last_seen,
        active={n: str(slot["active"]) for n, slot in d.models.items() if slot.get("active")},
        job_model=job.get("model"),
        job_state=job.get("state"),
        desired=DesiredSummary.model_validate(d.desired) if d.desired else None,
    )


def fleet_drift(
    s: ControllerSettings, registry: Registry, records: list[DeviceRecord], stale: bool
) -> list[Drift]:
    groups, pins = desired_documents(s, registry, stale)
    held = rollouts_in_flight(registry.conn)
    out: list[Drift] = []
    for d in records:
        mine = {m: rid for (dev, m), rid in held.items() if dev == d.id}
        out += device_drift(_view(d), groups, pins.get(d.id, {}), mine)
    return out


def drift_table(drifts: list[Drift]) -> Table:
    table = Table(title=f"{len(drifts)} drifted (device, model)", title_justify="left")
    for col in ("device", "groups", "model", "runs", "desired", "why", "detail"):
        table.add_column(col)
    for x in drifts:
        detail = x.detail + (f" (since {ago(x.since)})" if x.since is not None else "")
        table.add_row(x.device, ",".join(x.groups) or "-", x.model, x.active or "-",
                      x.want or "-", x.reason, detail)  # fmt: skip
    return table


def devices(
    ctx: typer.Context,
    group: str | None = typer.Option(None, "--group", help="only devices in this group"),
    drift: bool = typer.Option(
        False, "--drift", help="only robots not on their desired versions, and why"
    ),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for the broker"),
    output: Output = OutputOption,
) -> None:
    """List the fleet as the devices report it (retained status on the broker)."""
    configure_cli_logging()
    s = settings(ctx)
    if group is not None:
        try:
            validate_id(group, "group name")
        except ProtocolError as e:
            fail(e.reason)
    registry = open_registry(s)
    stale: str | None = None
    try:
        refresh_registry(s, registry, timeout)
    except MqttError as e:
        stale = "broker unreachable"
        typer.echo(f"jetfleet: {e}; showing the last known state", err=True)
    records = registry.devices(group)
    if drift:
        drifts = fleet_drift(s, registry, records, stale is not None)
        if output is Output.json:
            print_json([x.to_dict() for x in drifts])
        else:
            Console().print(drift_table(drifts))
        raise typer.Exit(EXIT_FAILED if stale else 0)
    skews = clock_skews(s, records, time.time())
    if output is Output.json:
        print_json(
            [
                {**d.to_dict(), "stale": stale is not None, "clock_skew_s": skews.get(d.id)}
                for d in records
            ]
        )
    else:
        Console().print(devices_table(records, skews, stale))
    for device_id, skew in skews.items():
        typer.echo(
            f"jetfleet: {device_id}'s clock is {skew_text(skew)}: every command to it fails "
            "(expired or issued in the future); enable NTP on it",
            err=True,
        )
    if stale:  # the data could not be refreshed: scripts must not take it as current
        raise typer.Exit(EXIT_FAILED)
