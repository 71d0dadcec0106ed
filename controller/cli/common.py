"""What every `jetfleet` command shares: exit codes (docs/protocol.md), errors, output
format, logging, and the hand-off of a stored rollout to its driver (start, follow, render).

The one module CLI modules import helpers from (besides the controller's own modules)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, NoReturn

import structlog
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controller.desired.releases import rollout_release
from controller.desired.store import read_rollout_releases
from controller.fleet import access as fleet_access
from controller.fleet.access import open_store
from controller.fleet.registry import Registry, TargetError
from controller.mqtt import MqttError
from controller.rollouts.driver import (
    DatabaseFullError,
    RolloutError,
    WaveSpecError,
    check_plan,
)
from controller.rollouts.launch import (
    PlannedRollout,
    RollbackModelError,
    RolloutRequest,
    UnseenDevicesError,
    id_list,
    make_driver,
    plan_rollout,
    spawn_driver,
)
from controller.rollouts.lease import LeaseHeldError, LeaseLostError, current_driver
from controller.rollouts.policy import RolloutPolicy, format_time
from controller.rollouts.store import (
    ABORTED,
    SUCCEEDED,
    DevicesHeldError,
    Rollout,
    RolloutStore,
    RolloutSummary,
)
from controller.security.keystore import KeySet, KeystoreError, load_keys
from controller.settings import ControllerSettings
from protocol.errors import ProtocolError
from protocol.transport import TransportConfigError

EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran and failed (e.g. rollout aborted)
EXIT_USAGE = 2  # usage or bad input
EXIT_VERIFY = 3  # verification failed


class Output(str, Enum):
    human = "human"
    json = "json"


OutputOption = typer.Option(Output.human, "--output", "-o", help="human or json")

AllowUnseenOption = typer.Option(
    False,
    "--allow-unseen",
    help="command devices named in --target that never reported to this controller "
    "(provisioning); without it a never-seen id is refused as a likely typo",
)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One clear line on stderr, then exit with the documented code."""
    typer.echo(f"jetfleet: {message}", err=True)
    raise typer.Exit(code)


def require_extra(module: str, command: str) -> None:
    """Exit with one line, not a traceback, when `command` needs a module of the
    `controller` extra that this install (e.g. a robot's base install) left out."""
    if importlib.util.find_spec(module) is None:
        fail(
            f"{command} needs {module} (the controller extra, not in the base install): "
            "pip install 'jetfleet[controller]'",
            EXIT_FAILED,
        )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def settings(ctx: typer.Context) -> ControllerSettings:
    """The settings resolved by the global options (see main.py)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, ControllerSettings):  # a sub-app invoked on its own in tests
        obj = ControllerSettings.load()
    return obj


def configure_cli_logging() -> None:
    """Logs go to stderr (stdout is for data, e.g. --output json); warnings and up unless
    JETFLEET_LOG_LEVEL says otherwise (the background rollout driver logs at info)."""
    level = os.environ.get("JETFLEET_LOG_LEVEL", "warning").upper()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level, logging.WARNING)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def refresh_registry(
    s: ControllerSettings, registry: Registry, timeout: float = 10.0, *, target: str | None = None
) -> int:
    """fleet_access.refresh_registry, exiting 2 with one line for unusable TLS settings or
    an invalid device id in `target` (MqttError, a broker down, is the caller's)."""
    try:
        return fleet_access.refresh_registry(s, registry, timeout, target=target)
    except TransportConfigError as e:
        fail(f"TLS settings: {e.reason}")
    except ProtocolError as e:
        fail(e.reason)


def ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, time.time() - ts)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    if s < 86400:
        return f"{s / 3600:.1f}h ago"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


# -- rollouts: options, start, the driver, progress ------------------------------------
WavesOption = typer.Option("1,10%,100%", "--waves", help="cumulative wave sizes: counts or %")
MaxFailOption = typer.Option(
    0.05, "--max-failure-rate", help="abort when failed/assigned exceeds this (0..1)"
)
WaveTimeoutOption = typer.Option(900.0, "--wave-timeout", help="seconds a wave may take")
WaitOption = typer.Option(False, "--wait", help="show live progress; exit 1 if it aborts")
CanaryOption = typer.Option(None, "--canary", help="device id to deploy to first")
TargetOption = typer.Option(..., "--target", help="group:NAME, ID[,ID...] or all")
ForceOption = typer.Option(
    False,
    "--force",
    help="DANGEROUS: start even though another running or paused rollout still drives some "
    "target devices; both then send them commands and race each other's versions",
)


def keyset(s: ControllerSettings) -> KeySet:
    if s.keys is None:
        fail("no key directory: pass --keys DIR or set JETFLEET_KEYS (see `jetfleet keys init`)")
    try:
        return load_keys(s.keys)
    except KeystoreError as e:
        fail(str(e), EXIT_VERIFY)


STATE_STYLE = {
    "SUCCEEDED": "green",
    "ROLLED_BACK": "yellow",
    "FAILED": "red",
    "REJECTED": "red",
    "TIMED_OUT": "red",
    "CANCELED": "yellow",
    "ON_HOLD": "cyan",
    "DEFERRED": "yellow",
}


def release_view(store: RolloutStore, r: Rollout) -> dict[str, Any]:
    """What the rollout did to its groups' releases (controller/desired/releases.py)."""
    return rollout_release(r, read_rollout_releases(store.conn, r.id))


def release_lines(r: Rollout, view: dict[str, Any]) -> list[Text]:
    if view["none"] is not None:
        return [Text(f"release: none set: {view['none']}")]
    lines = []
    for g in view["groups"]:
        what = f"{r.model} {r.version}"
        if g["outcome"] == "set":
            lines.append(Text(f"release: group {g['group']} v{g['version']} ({what})", "green"))
        elif g["outcome"] == "unchanged":
            lines.append(Text(f"release: group {g['group']} v{g['version']} had {what} already"))
        else:
            lines.append(Text(f"release: group {g['group']} not set: {g['reason']}", "red"))
    return lines


def _stage_lines(summary: RolloutSummary) -> list[Text]:
    """--stage: who waits STAGED (the old engine serving), whose staged job was gone
    when its `activate` came (not counted as failures), and, in an abort, whose cancel is
    still unanswered or went unanswered (they may hold the staged engine)."""
    r = summary.rollout
    out = []
    if summary.staged:
        then = f"; `jetfleet rollout activate {r.id}` switches them" if r.state == "staged" else ""
        out.append(Text(f"STAGED, the old engine serving: {id_list(summary.staged)}{then}",
                        style="cyan"))  # fmt: skip
    for d in summary.not_staged:
        out.append(Text(f"  {d['device_id']}: nothing staged to activate: {d['reason']}",
                        style="yellow"))  # fmt: skip
    if summary.cancels_pending:
        out.append(Text("cancel pending, the staged engine still on the robot (the abort waits "
                        f"up to --wave-timeout): {id_list(summary.cancels_pending)}",
                        style="yellow"))  # fmt: skip
    for d in summary.cancels_unacknowledged[:20]:
        out.append(Text(f"  {d['device_id']}: may still hold the staged engine: {d['reason']}",
                        style="yellow"))  # fmt: skip
    if len(summary.cancels_unacknowledged) > 20:
        out.append(Text(f"  … and {len(summary.cancels_unacknowledged) - 20} more"))
    return out


def render(summary: RolloutSummary, release: dict[str, Any] | None = None) -> Group:
    r = summary.rollout
    head = Text.assemble(
        (f"rollout {r.id}", "bold"),
        f"  {r.kind} {r.model} {r.version}  ",
        (r.state.upper(), {"succeeded": "green", "aborted": "red"}.get(r.state, "cyan")),
        f"  failure rate {summary.failure_rate:.0%} ({summary.failed}/{summary.assigned}, "
        f"max {r.max_failure_rate:.0%})",
    )
    table = Table(show_header=True, header_style="bold")
    table.add_column("wave")
    table.add_column("devices", justify="right")
    table.add_column("state")
    table.add_column("per state")
    now = time.time()
    for w in summary.waves:
        counts = ", ".join(
            f"[{STATE_STYLE.get(k, 'white')}]{k} {v}[/]" for k, v in sorted(w.counts.items())
        )
        state = w.state
        if w.state == "running" and w.deadline:
            state += f" ({max(0, w.deadline - now):.0f}s left)"
        label = "rollback" if w.state in ("rollback", "rolled_back") else str(w.idx + 1)
        table.add_row(label, str(w.size), state, counts or "-")
    parts: list[Any] = [head, table]
    if summary.rollbacks:
        parts.append(
            Text(
                "rollback commands: "
                + ", ".join(f"{k} {v}" for k, v in sorted(summary.rollbacks.items()))
            )
        )
    if summary.offline_pending:
        names = ", ".join(summary.offline_pending[:10])
        more = (
            f" and {len(summary.offline_pending) - 10} more"
            if len(summary.offline_pending) > 10
            else ""
        )
        parts.append(
            Text(f"pending, offline (command waits in the broker): {names}{more}", style="yellow")
        )
    if summary.not_judged:
        names = ", ".join(d["device_id"] for d in summary.not_judged[:10])
        more = f" and {len(summary.not_judged) - 10} more" if len(summary.not_judged) > 10 else ""
        parts.append(
            Text(
                f"not judged (device conditions moved, no verdict on the model; not counted "
                f"as failures, deploy again): {names}{more}",
                style="yellow",
            )
        )
    for f in summary.failures[:20]:
        parts.append(
            Text(f"  {f['device_id']}: {f['state']} [{f['code']}] {f['reason']}", style="red")
        )
    if len(summary.failures) > 20:
        parts.append(Text(f"  … and {len(summary.failures) - 20} more"))
    if r.policy.describe():
        parts.append(Text(f"policy: {r.policy.describe()}"))
    parts.extend(slo_lines(summary.slo_verdicts))
    parts.append(Text(f"offline robots: {r.policy.offline_text}"))
    if summary.left_to_release:
        parts.append(
            Text(
                "offline, left to converge through the release: "
                + id_list(summary.left_to_release),
                style="yellow",
            )
        )
    parts.extend(_stage_lines(summary))
    if r.state == "waiting_approval":
        parts.append(Text(f"waiting for approval: `jetfleet rollout promote {r.id}`", style="cyan"))
    if r.state == "scheduled" and r.policy.start_at is not None:
        parts.append(Text(f"scheduled: starts at {format_time(r.policy.start_at)}", style="cyan"))
    if r.abort_reason:
        parts.append(Text(f"abort: {r.abort_reason}", style="bold red"))
    if release is not None:
        parts.extend(release_lines(r, release))
    return Group(*parts)


_VERDICT_STYLE = {"PASS": "green", "FAIL": "bold red", "NOT_ENOUGH_DATA": "yellow"}


def slo_lines(verdicts: list[dict[str, Any]]) -> list[Text]:
    """One line per SLO verdict: wave, bake, the SLO, the verdict and its figures."""
    return [
        Text.assemble(
            f"SLO wave {v['wave'] + 1} ({v['bake'] or '-'}): {v['slo']} ",
            (v["verdict"], _VERDICT_STYLE.get(v["verdict"], "white")),
            f" {v['reason']}",
        )
        for v in verdicts
    ]


def gate_text(gate: dict[str, Any] | None) -> str:
    """The gate figures an operator compares at a glance (the JSON has them all)."""
    if not gate:
        return "-"
    parts = []
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99"), ("live_p99_ms", "live p99")):
        if isinstance(gate.get(key), int | float):
            parts.append(f"{label} {gate[key]:.2f} ms")
    comparison = (gate.get("speed") or {}).get("comparison") or {}
    if isinstance(comparison.get("median_change_pct"), int | float):
        parts.append(f"{comparison['median_change_pct']:+.1f}% vs active")
    return ", ".join(parts) or "-"


def finish(store: RolloutStore, rollout_id: str, output: Output) -> NoReturn:
    """Exit with the rollout's outcome: 0 succeeded, 1 aborted (its summary with --output
    json)."""
    summary = store.light_summary(rollout_id)
    if output is Output.json:
        data = summary.to_dict()
        data["devices"] = [a.to_dict() for a in store.assignments(rollout_id)]
        data["release"] = release_view(store, summary.rollout)
        print_json(data)
    state = summary.rollout.state
    raise typer.Exit(EXIT_OK if state == SUCCEEDED else EXIT_FAILED if state == ABORTED else 0)


@dataclass
class RedrawPacer:
    """When a live view may recompute its summary again: `min_s` after the last one at
    the soonest, and `factor` times what that one cost, so that on a slow database the
    view asks less often instead of taking the host's CPU from the driver (at most
    1/factor of its time)."""

    min_s: float = 0.25
    factor: float = 20.0
    next_at: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def drawn(self, started: float, ended: float) -> None:
        """A summary was computed from `started` to `ended` (monotonic seconds)."""
        self.next_at = started + max(self.min_s, self.factor * (ended - started))


def drive(
    s: ControllerSettings, keys: KeySet, rollout_id: str, output: Output, *, standby: bool = False
) -> None:  # never returns: exits with the rollout's outcome
    """Drive the rollout here to its end. `standby`: another live process drives it;
    follow it, and take over if that process dies (its lease expires)."""
    store, registry = open_store(s)
    console = Console(stderr=output is Output.json)
    live: Live | None = None
    pacer = RedrawPacer()

    def progress(st: RolloutStore, rid: str) -> None:
        # The driver's own thread: a redraw is time the driver does not drive.
        if live is None or not pacer.due(time.monotonic()):
            return
        started = time.monotonic()
        summary = st.light_summary(rid)
        pacer.drawn(started, time.monotonic())
        live.update(render(summary))

    try:
        driver = make_driver(s, keys, (store, registry), rollout_id, progress, standby=standby)
    except KeystoreError as e:
        fail(str(e), EXIT_VERIFY)
    try:
        if output is Output.human and console.is_terminal:
            with Live(
                render(store.light_summary(rollout_id)), console=console, refresh_per_second=4
            ) as lv:
                live = lv
                final = driver.run()
                lv.update(render(store.light_summary(rollout_id), release_view(store, final)))
        else:
            final = driver.run()
            if output is Output.human:
                console.print(render(store.light_summary(rollout_id), release_view(store, final)))
    except DatabaseFullError:
        fail(
            f"the disk holding {s.db} is full: rollout {rollout_id} stopped at its last saved "
            f"step; free space, then `jetfleet rollout resume {rollout_id}`",
            EXIT_FAILED,
        )
    except RolloutError as e:
        fail(str(e))
    except (LeaseHeldError, LeaseLostError) as e:
        fail(e.reason, EXIT_FAILED)
    except (MqttError, TransportConfigError) as e:
        fail(
            f"{e}; the rollout is saved: `jetfleet rollout resume {rollout_id}` continues it",
            EXIT_FAILED,
        )
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; continue with `jetfleet rollout resume {rollout_id}`", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    finish(store, rollout_id, output)


def launch(
    s: ControllerSettings, keys: KeySet, rollout_id: str, wait: bool, output: Output
) -> None:
    if wait:
        drive(s, keys, rollout_id, output)
    pid = spawn_driver(s, rollout_id)
    store, _ = open_store(s)
    if output is Output.json:
        print_json({**store.light_summary(rollout_id).to_dict(), "driver_pid": pid})
    else:
        typer.echo(
            f"rollout {rollout_id} started (driver pid {pid}); "
            f"follow it with `jetfleet rollout status {rollout_id}`"
        )


def hand_to_driver(
    s: ControllerSettings, r: Rollout, wait: bool, output: Output, message: str
) -> None:
    """After a change to a stored rollout: its live driver, on whichever host, acts on it
    (say `message`, its `{driver}` filled in; with --wait, follow it and take the rollout
    over should that driver die); with none alive, start one here."""
    store, _ = open_store(s)
    lease = current_driver(store, r.id)
    if lease is None:
        launch(s, keyset(s), r.id, wait, output)
        return
    if wait:
        drive(s, keyset(s), r.id, output, standby=True)
    typer.echo(message.format(driver=lease.describe()))


def start_rollout(
    s: ControllerSettings,
    *,
    kind: str,
    keys: KeySet,
    model: str,
    version: str,
    target: str,
    waves: str,
    max_failure_rate: float,
    wave_timeout: float,
    auto_rollback: bool,
    canary: str | None,
    bundle: tuple[str, str, int] | None = None,
    payload: str | None = None,
    force: bool = False,
    policy: RolloutPolicy | None = None,
    allow_unseen: bool = False,
    stage: bool = False,
) -> str:
    """Resolve the target against a fresh view of the fleet and store the planned rollout
    (rollouts/launch.py, plan_rollout); `keys` were loaded by the caller, who signs with them.

    Exits 2, storing nothing, for a never-seen device (unless `allow_unseen`), a rollback
    of a model a target device does not have, or a device another unfinished rollout
    still drives (unless `force`)."""
    del keys  # the driver signs; the caller has checked they load
    store, registry = open_store(s)
    try:
        refresh_registry(s, registry, target=target)
    except MqttError as e:
        fail(f"{e}; the rollout was not started", EXIT_FAILED)
    request = RolloutRequest(
        kind=kind,
        model=model,
        version=version,
        target=target,
        waves=waves,
        max_failure_rate=max_failure_rate,
        wave_timeout=wave_timeout,
        auto_rollback=auto_rollback,
        canary=canary,
        bundle=bundle,
        payload=payload,
        force=force,
        policy=policy,
        allow_unseen=allow_unseen,
        stage=stage,
    )
    try:
        planned = plan_rollout(store, registry, request)
    except (
        DevicesHeldError,
        TargetError,
        WaveSpecError,
        UnseenDevicesError,
        RollbackModelError,
    ) as e:
        fail(str(e))
    except ProtocolError as e:
        fail(e.reason)
    _warn_unreachable(planned, wave_timeout)
    return planned.rollout.id


def _warn_unreachable(planned: PlannedRollout, wave_timeout: float) -> None:
    if planned.offline:
        shown = ", ".join(planned.offline[:10]) + (" …" if len(planned.offline) > 10 else "")
        typer.echo(
            f"jetfleet: warning: {len(planned.offline)} target device(s) offline ({shown}): "
            "their commands wait in the broker; they count as TIMED_OUT if they do not "
            f"finish within --wave-timeout {wave_timeout:g}s",
            err=True,
        )
    if planned.unseen:
        typer.echo(
            f"jetfleet: warning: never seen {', '.join(planned.unseen)}: their commands wait "
            "in the broker until they connect or the wave times out",
            err=True,
        )


def check_plan_options(waves: str, max_failure_rate: float, wave_timeout: float) -> None:
    """rollout.check_plan, exiting 2 with its one line: before keys are loaded or the
    broker is asked anything."""
    try:
        check_plan(waves, max_failure_rate, wave_timeout)
    except WaveSpecError as e:
        fail(str(e))
