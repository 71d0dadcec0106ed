"""`jetfleet device show ID` (kubectl describe), `jetfleet device forget ID`, and
`jetfleet device windows TARGET` (maintenance windows by signed command)."""

from __future__ import annotations

from typing import Any

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
    gate_text,
    print_json,
    refresh_registry,
    settings,
)
from controller.fleet.access import mqtt_options, open_registry
from controller.fleet.registry import DeviceRecord, Registry
from controller.mqtt import ControllerMqtt, MqttError
from controller.rollouts.store import RolloutStore
from controller.settings import ControllerSettings
from controller.telemetry.store import TelemetryStore, TelemetryStoreError, default_telemetry_db
from protocol.errors import ProtocolError
from protocol.ids import validate_id
from protocol.telemetry import TelemetrySample

app = typer.Typer(
    help="One device: describe it, forget a decommissioned one, set maintenance windows."
)

DeviceArgument = typer.Argument(..., help="device id")
HISTORY = 20  # jobs shown


def _known(registry: Registry, device_id: str) -> DeviceRecord:
    try:
        validate_id(device_id)
    except ProtocolError as e:
        fail(e.reason)
    record = registry.get(device_id)
    if record is None:
        known = [d.id for d in registry.devices()]
        shown = ", ".join(known[:10]) + (" …" if len(known) > 10 else "")
        fail(f"no device {device_id!r} has reported to this controller (known: {shown or 'none'})")
    return record


def _refreshed(s: ControllerSettings, registry: Registry, device_id: str) -> bool:
    """Read the device's retained status; False (with a line on stderr) if the broker is
    down and what follows is the last known state."""
    try:
        refresh_registry(s, registry, target=device_id)
    except MqttError as e:
        typer.echo(f"jetfleet: {e}; showing the last known state", err=True)
        return False
    return True


def _latest_sample(s: ControllerSettings, device_id: str) -> TelemetrySample | None:
    try:
        store = TelemetryStore(default_telemetry_db(s.db_target()), readonly=True)
    except TelemetryStoreError:
        return None  # no `jetfleet serve` has collected telemetry here
    try:
        latest = [x for x in store.latest() if x.device_id == device_id]
        return latest[0].sample() if latest else None
    finally:
        store.close()


def _telemetry_text(sample: TelemetrySample) -> str:
    parts = [f"at {sample.at:%Y-%m-%d %H:%M:%S} UTC"]
    if sample.cpu.mean_percent is not None:
        parts.append(f"cpu {sample.cpu.mean_percent:.0f}%")
    if sample.mem is not None:
        parts.append(f"memory {sample.mem.used / 2**30:.2f}/{sample.mem.total / 2**30:.2f} GiB")
    if sample.temps:
        parts.append(f"max temp {max(sample.temps.values()):.1f}°C")
    if sample.gpu is not None and sample.gpu.load_pct is not None:
        parts.append(f"gpu {sample.gpu.load_pct:.0f}%")
    for name, m in sorted(sample.models.items()):
        if m.p99_ms is not None:
            parts.append(f"{name} {m.version or ''} p99 {m.p99_ms:.2f} ms".replace("  ", " "))
    return ", ".join(parts)


def _history_rows(store: RolloutStore, device_id: str) -> list[dict[str, Any]]:
    return [
        {
            "rollout_id": r.id,
            "kind": r.kind,
            "model": r.model,
            "version": r.version,
            "rollout_state": r.state,
            **{k: v for k, v in a.to_dict().items() if k not in ("rollout_id", "device_id")},
        }
        for r, a in store.device_history(device_id, HISTORY)
    ]


def windows_text(windows: dict[str, Any] | None) -> str:
    """The maintenance windows its status reports, their zone and who set them."""
    if windows is None:
        return "- (its agent does not report them)"
    specs = ", ".join(windows.get("windows") or []) or "any time"
    zone = windows.get("timezone") or "the robot's local time"
    by = "a windows command" if windows.get("source") == "command" else "agent.toml"
    return f"{specs} ({zone}; set by {by})"


def _describe(record: DeviceRecord, stale: bool, sample: TelemetrySample | None) -> Table:
    hw = record.hardware
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    online = ("[green]yes[/]" if record.online else "[red]no[/]") + (
        " [yellow](NOT REFRESHED: broker unreachable)[/]" if stale else ""
    )
    for key, value in (
        ("device", record.id),
        ("online", online),
        ("last seen", ago(record.last_seen)),
        ("groups", ", ".join(record.groups) or "-"),
        ("agent", record.agent_version or "-"),
        ("hardware", " / ".join(str(hw[k]) for k in ("device_model", "jetpack") if hw.get(k))),
        ("backend", " ".join(str(hw[k]) for k in ("backend", "backend_version") if hw.get(k))),
        ("trust root", f"version {record.trust_version}" if record.trust_version else "-"),
        ("windows", windows_text(record.windows)),
        ("telemetry", _telemetry_text(sample) if sample else "none received"),
    ):
        facts.add_row(key, value or "-")
    return facts


def _models_table(record: DeviceRecord) -> Table:
    table = Table(title="models", title_justify="left")
    for col in ("model", "active", "previous"):
        table.add_column(col)
    for name, slot in sorted(record.models.items()):
        table.add_row(name, slot.get("active") or "-", slot.get("previous") or "-")
    return table


def _jobs_table(store: RolloutStore, device_id: str) -> Table:
    table = Table(title=f"jobs (last {HISTORY})", title_justify="left")
    for col in ("rollout", "kind", "model", "version", "state", "gate", "reason"):
        table.add_column(col, no_wrap=col == "rollout")
    for r, a in store.device_history(device_id, HISTORY):
        table.add_row(r.id, r.kind, r.model, r.version, a.state, gate_text(a.gate), a.reason or "-")
    return table


@app.command("show")
def show(
    ctx: typer.Context, device_id: str = DeviceArgument, output: Output = OutputOption
) -> None:
    """Everything known about one device: models, groups, hardware, last seen, trust root
    version, its jobs with gate figures and reasons, and its latest telemetry."""
    configure_cli_logging()
    s = settings(ctx)
    registry = open_registry(s)
    fresh = _refreshed(s, registry, device_id)
    record = _known(registry, device_id)
    store = RolloutStore(registry.conn, offline=registry.offline_ids)
    sample = _latest_sample(s, device_id)
    if output is Output.json:
        print_json(
            {
                **record.to_dict(),
                "stale": not fresh,
                "jobs": _history_rows(store, device_id),
                "telemetry": sample.to_dict() if sample else None,
            }
        )
    else:
        console = Console()
        console.print(_describe(record, not fresh, sample))
        console.print(_models_table(record))
        console.print(_jobs_table(store, device_id))
    if not fresh:
        raise typer.Exit(EXIT_FAILED)


@app.command("forget")
def forget(ctx: typer.Context, device_id: str = DeviceArgument) -> None:
    """Forget a decommissioned device: its record here and its retained status on the
    broker (so no controller lists it again). Refused while it is online."""
    configure_cli_logging()
    s = settings(ctx)
    registry = open_registry(s)
    if not _refreshed(s, registry, device_id):
        fail("the broker is needed to clear the device's retained status", EXIT_FAILED)
    record = _known(registry, device_id)
    if record.online:
        fail(
            f"{device_id} is online: stop its agent first (a running agent publishes its "
            "status again)"
        )
    try:
        with ControllerMqtt(mqtt_options(s)).connect() as m:
            m.publish(registry.topics.status(device_id), b"", retain=True)
    except MqttError as e:
        fail(f"{e}; {device_id} was not forgotten", EXIT_FAILED)
    registry.forget(device_id)
    typer.echo(f"forgot {device_id} (its retained status is cleared)")


@app.command("windows")
def windows(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="a device id or group:NAME"),
    window: list[str] = typer.Option(
        [], "--window", help='e.g. "Mon-Fri 22:00-06:00" (repeat; none: any time)'
    ),
    timezone: str = typer.Option("", "--timezone", help="IANA zone; empty: the device's"),
    clear: bool = typer.Option(False, "--clear", help="back to each device's agent.toml"),
) -> None:
    """Set when the target's robots may switch engines (they download, build and gate at
    once; the switch waits ON_HOLD for a window). Replaces agent.toml's windows until
    --clear; the last windows command a device received wins. Each device answers with a
    SUCCEEDED event, or REJECTED bad_windows for a spec it cannot parse."""
    from agent.windows import WindowError, Windows
    from controller.cli.common import keyset
    from controller.rollouts.launch import command_signer
    from protocol.topics import Topics

    configure_cli_logging()
    s = settings(ctx)
    try:
        Windows(window, timezone)  # the same parser the agent uses: fail here, not there
        signed = command_signer(s, keyset(s), None).windows(
            target, windows=window, timezone=timezone, clear=clear
        )
    except (WindowError, ProtocolError) as e:
        fail(e.reason)
    topics = Topics(s.prefix)
    topic = (
        topics.group_cmd(target[6:]) if target.startswith("group:") else topics.device_cmd(target)
    )
    try:
        with ControllerMqtt(mqtt_options(s)).connect() as m:
            m.publish(topic, signed.envelope)
    except MqttError as e:
        fail(f"{e}; the windows command was not sent", EXIT_FAILED)
    typer.echo(f"sent windows command {signed.command_id} to {target}")
