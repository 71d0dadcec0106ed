"""`jetfleet rollout start|status|list|pause|resume|abort|promote|retry|activate`
(docs/operations.md, Rollouts)."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from controller.bundles.publish import BundleConflictError, choose_bundle_url, publish_bundle
from controller.cli.common import (
    EXIT_FAILED,
    EXIT_VERIFY,
    STATE_STYLE,
    AllowUnseenOption,
    CanaryOption,
    ForceOption,
    MaxFailOption,
    Output,
    OutputOption,
    TargetOption,
    WaitOption,
    WavesOption,
    WaveTimeoutOption,
    check_plan_options,
    configure_cli_logging,
    fail,
    finish,
    gate_text,
    hand_to_driver,
    keyset,
    launch,
    print_json,
    release_view,
    render,
    settings,
    start_rollout,
)
from controller.fleet.access import open_store
from controller.rollouts.activation import ActivationError, activate_staged, activation_policy
from controller.rollouts.driver import (
    RolloutError,
    WaveSpecError,
    failed_devices,
    pause,
    promote,
    resume_state,
)
from controller.rollouts.lease import LeaseHeldError, LeaseLostError, current_driver
from controller.rollouts.policy import (
    DEFAULT_OFFLINE,
    PolicyError,
    make_policy,
)
from controller.rollouts.store import (
    FINISHED,
    PAUSED,
    STAGED,
    Assignment,
    Rollout,
    RolloutStore,
    disk_nearly_full,
)
from controller.security.keystore import retired_signer_reason
from controller.settings import ControllerSettings
from protocol.bundle import verify_bundle
from protocol.errors import VerificationError
from protocol.fsio import sha256_file

app = typer.Typer(
    help="Roll a bundle out to the fleet in waves, and steer rollouts.", no_args_is_help=True
)


# -- shared plumbing -------------------------------------------------------------------


def latest_rollout(store: RolloutStore) -> Rollout:
    recent = store.recent(1)
    if not recent:
        fail("no rollout yet (see `jetfleet rollout start`)")
    return recent[0]


def find_rollout(store: RolloutStore, rollout_id: str) -> Rollout:
    r = store.find(rollout_id)
    if r is None:
        fail(f"no rollout {rollout_id!r} (see `jetfleet rollout list`)")
    return r


# -- progress --------------------------------------------------------------------------


# -- commands --------------------------------------------------------------------------
@app.command("start")
def start(
    ctx: typer.Context,
    bundle: Path = typer.Argument(..., help="the .jfb bundle to roll out"),
    target: str = TargetOption,
    waves: str = WavesOption,
    max_failure_rate: float = MaxFailOption,
    wave_timeout: float = WaveTimeoutOption,
    no_auto_rollback: bool = typer.Option(
        False, "--no-auto-rollback", help="on abort, leave succeeded devices on the new version"
    ),
    wait: bool = WaitOption,
    canary: str | None = CanaryOption,
    bundle_url: str | None = typer.Option(None, "--bundle-url", help="where devices fetch it"),
    force: bool = ForceOption,
    abort_on: str = typer.Option(
        "",
        "--abort-on",
        help="abort thresholds per failure type (FAILED, REJECTED, ROLLED_BACK, TIMED_OUT, "
        "ALL; A+B counts together), e.g. ROLLED_BACK>5%,TIMED_OUT>20%",
    ),
    min_finished: int = typer.Option(
        0, "--min-finished", help="no abort decision before this many devices finished"
    ),
    max_per_minute: int | None = typer.Option(
        None, "--max-per-minute", help="release at most this many commands a minute (1..1000)"
    ),
    start_at: str | None = typer.Option(
        None, "--start-at", help="scheduled start: ISO 8601 time (UTC if no zone) or +30m"
    ),
    approve_waves: bool = typer.Option(
        False, "--approve-waves", help="after each wave wait for `jetfleet rollout promote ID`"
    ),
    device_timeout: float | None = typer.Option(
        None,
        "--device-timeout",
        help="seconds a device's job may stay in one state; then it is canceled, TIMED_OUT",
    ),
    retries: int = typer.Option(
        0, "--retries", help="new commands for a device whose job failed so (0..10)"
    ),
    retry_on: str = typer.Option(
        "FAILED,TIMED_OUT",
        "--retry-on",
        help="which endings --retries cures: FAILED, TIMED_OUT, DEFERRED",
    ),
    retry_backoff: float = typer.Option(
        10.0, "--retry-backoff", help="seconds before the first retry (doubles after each)"
    ),
    slo: list[str] = typer.Option(
        [],
        "--slo",
        help="judged after each wave's bake, new version against old: METRIC OP VALUE[%], "
        "e.g. 'latency_p99 <= +10%', 'gpu_temp_c < 85' (repeatable; docs/operations.md)",
    ),
    bake: str | None = typer.Option(
        None, "--bake", help="how long each wave runs before its SLOs are judged (90s, 10m)"
    ),
    bake_max: str | None = typer.Option(
        None, "--bake-max", help="a bake short of data goes on up to this [default: 3x --bake]"
    ),
    slo_inconclusive: str = typer.Option(
        "abort", "--slo-inconclusive", help="still not enough data at --bake-max: abort|continue"
    ),
    offline: str = typer.Option(
        DEFAULT_OFFLINE,
        "--offline",
        help="a robot offline when its wave starts: wait (up to the wave timeout, then left "
        "to the release), skip (no command; left to the release), fail (TIMED_OUT)",
    ),
    allow_unseen: bool = AllowUnseenOption,
    stage: bool = typer.Option(
        False,
        "--stage",
        help="robots download, build and gate, then wait STAGED with the old engine "
        "serving; `jetfleet rollout activate ID` switches them",
    ),
    output: Output = OutputOption,
) -> None:
    """Verify BUNDLE, publish it, and deploy it to the target in waves."""
    configure_cli_logging()
    s = settings(ctx)
    check_plan_options(waves, max_failure_rate, wave_timeout)
    if stage and slo:
        fail("--slo judges a running version: give it to `rollout activate`, not --stage")
    try:
        policy = make_policy(
            abort_on=abort_on,
            min_finished=min_finished,
            max_per_minute=max_per_minute,
            start_at=start_at,
            approve_waves=approve_waves,
            device_timeout=device_timeout,
            retries=retries,
            retry_on=retry_on,
            retry_backoff=retry_backoff,
            slos=tuple(slo),
            bake=bake,
            bake_max=bake_max,
            slo_inconclusive=slo_inconclusive,
            offline=offline,
            now=time.time(),
        )
    except PolicyError as e:
        fail(str(e))
    if not bundle.is_file():
        fail(f"bundle {bundle} does not exist")
    keys = keyset(s)
    try:
        manifest = verify_bundle(bundle, keys.trust, datetime.now(timezone.utc))
    except VerificationError as e:
        reason = retired_signer_reason(s.keys, bundle, keys.trust) or e.reason
        fail(f"bundle {bundle} failed verification [{e.code}]: {reason}", EXIT_VERIFY)
    except OSError as e:
        fail(f"bundle {bundle}: {e.strerror}")
    try:
        published = publish_bundle(bundle.resolve(), s, manifest.name, manifest.version)
    except BundleConflictError as e:
        fail(str(e))
    url, why = choose_bundle_url(s, published, bundle_url)
    rid = start_rollout(
        s,
        kind="deploy",
        keys=keys,
        model=manifest.name,
        version=manifest.version,
        target=target,
        waves=waves,
        max_failure_rate=max_failure_rate,
        wave_timeout=wave_timeout,
        auto_rollback=not no_auto_rollback,
        canary=canary,
        bundle=(url, sha256_file(published), published.stat().st_size),
        force=force,
        policy=policy,
        allow_unseen=allow_unseen,
        stage=stage,
    )
    typer.echo(f"jetfleet: bundle URL {url}: {why}", err=True)
    if output is Output.human:
        typer.echo(f"rollout {rid}: {manifest.name} {manifest.version} from {url}", err=True)
    launch(s, keys, rid, wait, output)


def assignments_table(assignments: list[Assignment]) -> Table:
    """One row per device: where its job stands, the gate's figures and its reason."""
    table = Table(title="devices", title_justify="left", show_header=True, header_style="bold")
    for col in ("device", "wave", "state", "from", "gate", "rollback", "reason"):
        table.add_column(col, no_wrap=col == "device")
    for a in assignments:
        rollback = f"{a.rb_state} to {a.rb_to_version}" if a.rb_state else "-"
        table.add_row(
            a.device_id,
            str(a.wave + 1),
            f"[{STATE_STYLE.get(a.state, 'white')}]{a.state}[/]",
            a.prev_version or "-",
            gate_text(a.gate),
            rollback,
            a.rb_reason or a.reason or "-",
        )
    return table


@app.command("status")
def status(
    ctx: typer.Context,
    rollout_id: str | None = typer.Argument(
        None, help="rollout id or a unique prefix of it [default: the latest rollout]"
    ),
    output: Output = OutputOption,
) -> None:
    """Where a rollout stands: waves, per-state counts, and every device with its gate
    figures and reason."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    r = find_rollout(store, rollout_id) if rollout_id else latest_rollout(store)
    summary = store.light_summary(r.id)
    lease = current_driver(store, r.id)
    driven = lease is not None
    release = release_view(store, r)
    if output is Output.json:
        data = summary.to_dict()
        data["driver_alive"] = driven
        data["driver"] = lease.describe() if lease is not None else None
        data["devices"] = [a.to_dict() for a in store.assignments(r.id)]
        data["release"] = release
        print_json(data)
        return
    console = Console()
    console.print(render(summary, release))
    console.print(assignments_table(store.assignments(r.id)))
    if r.state not in FINISHED and lease is not None:
        typer.echo(f"driven by {lease.describe()}")
    elif r.state == STAGED:
        typer.echo(f"staged: `jetfleet rollout activate {r.id}` switches its robots")
    elif r.state not in FINISHED:
        typer.echo(f"no controller process is driving it{_why_undriven(s)}: "
                   f"`jetfleet rollout resume {r.id}`")  # fmt: skip


def _why_undriven(s: ControllerSettings) -> str:
    """A driver stops when it cannot write the database: say so while that is the case."""
    free = disk_nearly_full(s.db)
    if free is None:
        return ""
    return f" (the disk holding {s.db} is full, {free // 1024} KiB free: free space first)"


def print_unwrapped(table: Table) -> None:
    """As wide as the table needs, whatever the terminal (as kubectl prints): a cut or
    folded id could not be copied into the next command."""
    console = Console()
    needed = console.measure(table, options=console.options.update_width(1000)).maximum
    Console(width=max(console.width, needed)).print(table)


class ListOutput(str, Enum):
    human = "human"
    wide = "wide"
    json = "json"


_LIST_COLUMNS = ("id", "kind", "model", "version", "state", "target", "devices", "failed")
# `-o wide` adds these, as kubectl does.
_WIDE_COLUMNS = ("waves", "max failure", "wave timeout", "canary", "abort reason")


def _list_row(store: RolloutStore, r: Rollout) -> dict[str, Any]:
    sm = store.light_summary(r.id)
    return {
        "id": r.id,
        "kind": r.kind,
        "model": r.model,
        "version": r.version,
        "state": r.state,
        "target": r.target,
        "devices": sum(w.size for w in sm.waves if w.state not in ("rollback", "rolled_back")),
        "failed": sm.failed,
        "created_at": r.created_at,
        "waves": ",".join(str(w.size) for w in sm.waves),
        "max_failure_rate": r.max_failure_rate,
        "wave_timeout": r.wave_timeout,
        "canary": r.canary,
        "abort_reason": r.abort_reason,
    }


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: int = typer.Option(50, "--limit", min=1),
    output: ListOutput = typer.Option(
        ListOutput.human, "--output", "-o", help="human, wide (more columns) or json"
    ),
) -> None:
    """Recent rollouts, newest first. Every command that takes a rollout id also takes a
    unique prefix of it (`r-3f2`)."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    rows = [_list_row(store, r) for r in store.recent(limit)]
    if output is ListOutput.json:
        print_json(rows)
        return
    wide = output is ListOutput.wide
    table = Table(title="rollouts", title_justify="left")
    for col in (*_LIST_COLUMNS, "created", *(_WIDE_COLUMNS if wide else ())):
        # An id is never cut: it is what the operator copies into the next command.
        table.add_column(col, no_wrap=col in ("id", "created"))
    for row in rows:
        created = datetime.fromtimestamp(row["created_at"], timezone.utc)
        cells = [str(row[c]) for c in _LIST_COLUMNS] + [f"{created:%Y-%m-%d %H:%M:%S}"]
        if wide:
            cells += [
                row["waves"],
                f"{row['max_failure_rate']:g}",
                f"{row['wave_timeout']:g}s",
                row["canary"] or "-",
                row["abort_reason"] or "-",
            ]
        table.add_row(*cells)
    print_unwrapped(table)


def already_ended(store: RolloutStore, r: Rollout, output: Output) -> NoReturn:
    """`pause`, `resume` and `abort` of a rollout that has ended all answer alike: one
    line, the summary with --output json, and the rollout's own outcome as exit code
    (0 succeeded, 1 aborted), as `--wait` would have."""
    typer.echo(f"jetfleet: rollout {r.id} already ended: {r.state}", err=True)
    finish(store, r.id, output)
    raise AssertionError("unreachable")  # finish always exits


@app.command("pause")
def pause_cmd(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(..., help="rollout id or a unique prefix of it"),
    output: Output = OutputOption,
) -> None:
    """Start no further waves (devices already commanded finish their jobs)."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    r = find_rollout(store, rollout_id)
    if r.state in FINISHED:
        already_ended(store, r, output)
    if not pause(store, r.id):
        fail(f"rollout {r.id} is {r.state}; only a running rollout can be paused", EXIT_FAILED)
    if output is Output.json:
        print_json(store.light_summary(r.id).to_dict())
        return
    typer.echo(f"rollout {r.id} paused; `jetfleet rollout resume {r.id}` continues it")


@app.command("resume")
def resume(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(..., help="rollout id or a unique prefix of it"),
    wait: bool = WaitOption,
    output: Output = OutputOption,
) -> None:
    """Continue a paused rollout, or one whose controller died (no device gets a second
    command for the same job). With --wait while a live process on any host drives it:
    follow it, and take it over once that process's lease expires (docs/scale-out.md)."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    r = find_rollout(store, rollout_id)
    if r.state in FINISHED:
        already_ended(store, r, output)
    if r.state == STAGED:
        fail(f"rollout {r.id} is staged: `jetfleet rollout activate {r.id}` switches its "
             "robots; `jetfleet rollout abort` cancels the staged jobs")  # fmt: skip
    if r.state == PAUSED:
        resume_state(store, r.id)
    hand_to_driver(s, r, wait, output, f"rollout {r.id} resumed; driven by {{driver}}")


@app.command("abort")
def abort(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(..., help="rollout id or a unique prefix of it"),
    no_rollback: bool = typer.Option(
        False, "--no-rollback", help="leave devices that already succeeded on the new version"
    ),
    wait: bool = WaitOption,
    output: Output = OutputOption,
) -> None:
    """Stop a rollout: no further waves, in-flight jobs of the running wave are canceled
    (a device already activating finishes), and devices that succeeded are rolled back
    unless --no-rollback or the rollout had --no-auto-rollback."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    r = find_rollout(store, rollout_id)
    rollback = r.auto_rollback and not no_rollback
    if not store.request_abort(r.id, "aborted by the operator", rollback):
        already_ended(store, store.get(r.id) or r, output)
    hand_to_driver(s, r, wait, output, f"rollout {r.id} aborting; {{driver}} is finishing it")


@app.command("promote")
def promote_cmd(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(...),
    wait: bool = WaitOption,
    output: Output = OutputOption,
) -> None:
    """Approve the next wave of a rollout started with --approve-waves."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    r = find_rollout(store, rollout_id)
    if not promote(store, r.id):
        fail(f"rollout {r.id} is {r.state}; only one waiting for approval can be promoted")
    hand_to_driver(s, r, wait, output, f"rollout {r.id} promoted; {{driver}} starts the next wave")


@app.command("activate")
def activate_cmd(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(..., help="a rollout started with --stage, now staged"),
    waves: str | None = typer.Option(
        None, "--waves", help="cumulative wave sizes over the STAGED robots [default: the stage's]"
    ),
    max_failure_rate: float | None = typer.Option(
        None, "--max-failure-rate", help="abort above this (0..1) [default: the stage's]"
    ),
    wave_timeout: float | None = typer.Option(
        None, "--wave-timeout", help="seconds a wave may take [default: the stage's]"
    ),
    canary: str | None = CanaryOption,
    abort_on: str | None = typer.Option(None, "--abort-on", help="as for `rollout start`"),
    min_finished: int | None = typer.Option(None, "--min-finished", help="as for start"),
    max_per_minute: int | None = typer.Option(None, "--max-per-minute", help="as for start"),
    approve_waves: bool | None = typer.Option(
        None, "--approve-waves/--no-approve-waves", help="as for start [default: the stage's]"
    ),
    device_timeout: float | None = typer.Option(None, "--device-timeout", help="as for start"),
    no_auto_rollback: bool = typer.Option(
        False, "--no-auto-rollback", help="on abort, leave switched robots on the new version"
    ),
    wait: bool = WaitOption,
    output: Output = OutputOption,
) -> None:
    """Switch the STAGED robots of a rollout started with --stage, in waves, with the
    usual failure threshold, abort and automatic rollback (seconds each: nothing is built).
    Options left out keep the stage's."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    r = find_rollout(store, rollout_id)
    keyset(s)  # the driver signs: check the keys load before anything is stored
    try:
        policy = activation_policy(
            r.policy,
            abort_on=abort_on,
            min_finished=min_finished,
            max_per_minute=max_per_minute,
            approve_waves=approve_waves,
            device_timeout=device_timeout,
            now=time.time(),
        )
        plan = activate_staged(
            store,
            r.id,
            waves_spec=waves,
            max_failure_rate=max_failure_rate,
            wave_timeout=wave_timeout,
            auto_rollback=False if no_auto_rollback else None,
            policy=policy,
            canary=canary,
            now=time.time(),
        )
    except (PolicyError, WaveSpecError, ActivationError) as e:
        fail(str(e))
    if output is Output.human:
        typer.echo(f"rollout {r.id}: activating {len(plan.devices)} STAGED robot(s)", err=True)
        for a in plan.left_out:
            typer.echo(f"  left out: {a.device_id} {a.state} {a.reason or ''}".rstrip(), err=True)
    hand_to_driver(s, plan.rollout, wait, output,
                   f"rollout {r.id} activating; {{driver}} drives it")  # fmt: skip


@app.command("retry")
def retry_cmd(
    ctx: typer.Context,
    rollout_id: str = typer.Argument(...),
    wait: bool = WaitOption,
    force: bool = ForceOption,
    output: Output = OutputOption,
) -> None:
    """A new rollout over only the devices that failed in ROLLOUT_ID, with the same
    bundle, waves, thresholds and policy (starting now)."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    try:
        old, failed = failed_devices(store, find_rollout(store, rollout_id).id)
    except RolloutError as e:
        fail(str(e))
    except (LeaseHeldError, LeaseLostError) as e:
        fail(e.reason, EXIT_FAILED)
    keys = keyset(s)
    bundle = None
    if old.bundle_url and old.bundle_sha256 and old.bundle_size:
        bundle = (old.bundle_url, old.bundle_sha256, old.bundle_size)
    rid = start_rollout(
        s,
        kind=old.kind,
        keys=keys,
        model=old.model,
        version=old.version,
        target=",".join(failed),
        waves=old.waves_spec,
        max_failure_rate=old.max_failure_rate,
        wave_timeout=old.wave_timeout,
        auto_rollback=old.auto_rollback,
        canary=old.canary if old.canary in failed else None,
        bundle=bundle,
        payload=old.payload,
        force=force,
        policy=replace(old.policy, start_at=None),
        allow_unseen=True,  # ID already took them; a retry must not drop the unseen ones
        stage=old.phase is not None,  # a staged rollout's retry stages again
    )
    if output is Output.human:
        typer.echo(f"rollout {rid}: retry of {old.id} on {len(failed)} device(s)", err=True)
    launch(s, keys, rid, wait, output)
