"""`jetfleet rollout start|status|list|pause|resume|abort` (docs/operations.md, Rollouts)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn

import psutil
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controller.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_VERIFY,
    AllowUnseenOption,
    Output,
    OutputOption,
    fail,
    print_json,
    settings,
)
from controller.cli.devices import (
    configure_cli_logging,
    mqtt_options,
    open_registry,
    refresh_registry,
)
from controller.commands import CommandSigner
from controller.keystore import (
    KeySet,
    KeystoreError,
    load_keys,
    retired_signer_reason,
    trust_update_signers,
)
from controller.mqtt import MqttError
from controller.registry import Registry, TargetError
from controller.rollout import (
    DatabaseFullError,
    RolloutDriver,
    RolloutError,
    WaveSpecError,
    create_rollout,
    driver_alive,
    failed_devices,
    pause,
    promote,
    resume_state,
)
from controller.rollout_policy import (
    DEFAULT_OFFLINE,
    PolicyError,
    RolloutPolicy,
    format_time,
    make_policy,
)
from controller.rollout_store import (
    ABORTED,
    FINISHED,
    PAUSED,
    SUCCEEDED,
    Assignment,
    DevicesHeldError,
    Rollout,
    RolloutStore,
    RolloutSummary,
    disk_nearly_full,
)
from controller.settings import ControllerSettings
from controller.slo_bake import TelemetrySource
from controller.telemetry_store import default_telemetry_db
from protocol.bundle import bundle_filename, verify_bundle
from protocol.errors import CodedError, ProtocolError, VerificationError
from protocol.fsio import atomic_file, sha256_file
from protocol.topics import Topics
from protocol.transport import TransportConfigError

app = typer.Typer(
    help="Roll a bundle out to the fleet in waves, and steer rollouts.", no_args_is_help=True
)

SERVE_STATE = "serve.json"

# Options shared with `jetfleet rollback`.
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


# -- shared plumbing -------------------------------------------------------------------
def keyset(s: ControllerSettings) -> KeySet:
    if s.keys is None:
        fail("no key directory: pass --keys DIR or set JETFLEET_KEYS (see `jetfleet keys init`)")
    try:
        return load_keys(s.keys)
    except KeystoreError as e:
        fail(str(e), EXIT_VERIFY)


def open_store(s: ControllerSettings) -> tuple[RolloutStore, Registry]:
    registry = open_registry(s)
    return RolloutStore(registry.conn, offline=registry.offline_ids), registry


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


def serve_base_url(s: ControllerSettings) -> tuple[str | None, str]:
    """The bundle server of a running `jetfleet serve`, from its state file, and why it
    was or was not found (the file sits next to serve's --db, so another --db misses it)."""
    data_dir = Path(getattr(s, "data_dir", None) or s.db.parent)
    path = data_dir / SERVE_STATE
    try:
        state = json.loads(path.read_text())
        pid, base = int(state["pid"]), str(state["bundle_url_base"])
    except FileNotFoundError:
        return None, f"no `jetfleet serve` state file at {path} (serve writes it next to its --db)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable `jetfleet serve` state file {path} ({e})"
    if not psutil.pid_exists(pid):
        return None, f"{path} names process {pid}, which is no longer running"
    return base.rstrip("/"), f"from the running `jetfleet serve` (pid {pid}, {path})"


def choose_bundle_url(
    s: ControllerSettings, published: Path, override: str | None
) -> tuple[str, str]:
    """Where devices fetch the bundle, and why that URL (for the operator)."""
    if override:
        url, why = override, "from --bundle-url"
    else:
        base, why = serve_base_url(s)
        if base:
            url = f"{base}/{published.name}"
        else:
            url = published.resolve().as_uri()
            why += (
                "; only devices that can read this path can fetch it: run `jetfleet serve` "
                "with the same --db, or pass --bundle-url"
            )
    return url, why


class BundleConflictError(CodedError, ValueError):
    """A different bundle is already published under the same name and version."""

    code = "bundle_conflict"


def publish_bundle(bundle: Path, s: ControllerSettings, name: str, version: str) -> Path:
    """Copy the bundle into the bundle directory (temp + fsync + rename): what devices
    download must not change if the operator rebuilds their working copy. A published
    name-version is immutable: commands already out carry its sha256."""
    s.bundle_dir.mkdir(parents=True, exist_ok=True)
    dest = s.bundle_dir / bundle_filename(name, version)
    if dest.exists():
        if sha256_file(dest) == sha256_file(bundle):
            return dest
        raise BundleConflictError(
            f"{dest} is already published with different content; a version is immutable "
            "once rolled out: build this one with a new version"
        )
    with atomic_file(dest, 0o644) as out, bundle.open("rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


# -- progress --------------------------------------------------------------------------
_STATE_STYLE = {
    "SUCCEEDED": "green",
    "ROLLED_BACK": "yellow",
    "FAILED": "red",
    "REJECTED": "red",
    "TIMED_OUT": "red",
    "CANCELED": "yellow",
    "ON_HOLD": "cyan",
    "DEFERRED": "yellow",
}


def render(summary: RolloutSummary) -> Group:
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
            f"[{_STATE_STYLE.get(k, 'white')}]{k} {v}[/]" for k, v in sorted(w.counts.items())
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
                "offline, left to converge through the release: " + _names(summary.left_to_release),
                style="yellow",
            )
        )
    if r.state == "waiting_approval":
        parts.append(Text(f"waiting for approval: `jetfleet rollout promote {r.id}`", style="cyan"))
    if r.state == "scheduled" and r.policy.start_at is not None:
        parts.append(Text(f"scheduled: starts at {format_time(r.policy.start_at)}", style="cyan"))
    if r.abort_reason:
        parts.append(Text(f"abort: {r.abort_reason}", style="bold red"))
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


def _finish(store: RolloutStore, rollout_id: str, output: Output) -> None:
    summary = store.summary(rollout_id)
    if output is Output.json:
        data = summary.to_dict()
        data["devices"] = [a.to_dict() for a in store.assignments(rollout_id)]
        print_json(data)
    state = summary.rollout.state
    raise typer.Exit(EXIT_OK if state == SUCCEEDED else EXIT_FAILED if state == ABORTED else 0)


def command_signer(s: ControllerSettings, keys: KeySet, rollout: Rollout | None) -> CommandSigner:
    """The current operator key; for a trust update also the retired ones, since devices
    still on the old trust root know only those (see keystore.trust_update_signers)."""
    if rollout is not None and rollout.kind == "trust_update" and s.keys is not None:
        try:
            return CommandSigner(trust_update_signers(s.keys, keys))
        except KeystoreError as e:
            fail(str(e), EXIT_VERIFY)
    return CommandSigner([keys.operator])


def drive(
    s: ControllerSettings, keys: KeySet, rollout_id: str, output: Output
) -> None:  # never returns: exits with the rollout's outcome
    store, registry = open_store(s)
    console = Console(stderr=output is Output.json)
    live: Live | None = None
    last = [0.0]

    def progress(st: RolloutStore, rid: str) -> None:
        if live is None or time.monotonic() - last[0] < 0.25:
            return
        last[0] = time.monotonic()
        live.update(render(st.summary(rid)))

    driver = RolloutDriver(
        store,
        registry,
        command_signer(s, keys, store.get(rollout_id)),
        mqtt_options(s),
        rollout_id,
        topics=Topics(s.prefix),
        on_progress=progress,
        slo_source=TelemetrySource(default_telemetry_db(s.db)),
    )
    try:
        if output is Output.human and console.is_terminal:
            with Live(
                render(store.summary(rollout_id)), console=console, refresh_per_second=4
            ) as lv:
                live = lv
                driver.run()
                lv.update(render(store.summary(rollout_id)))
        else:
            driver.run()
            if output is Output.human:
                console.print(render(store.summary(rollout_id)))
    except DatabaseFullError:
        fail(
            f"the disk holding {s.db} is full: rollout {rollout_id} stopped at its last saved "
            f"step; free space, then `jetfleet rollout resume {rollout_id}`",
            EXIT_FAILED,
        )
    except RolloutError as e:
        fail(str(e))
    except (MqttError, TransportConfigError) as e:
        fail(
            f"{e}; the rollout is saved: `jetfleet rollout resume {rollout_id}` continues it",
            EXIT_FAILED,
        )
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; continue with `jetfleet rollout resume {rollout_id}`", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    _finish(store, rollout_id, output)


def watch(s: ControllerSettings, rollout_id: str, output: Output) -> None:
    """Follow a rollout another process drives (read-only) until it finishes."""
    store, _ = open_store(s)
    console = Console(stderr=output is Output.json)
    with Live(
        render(store.summary(rollout_id)),
        console=console,
        refresh_per_second=2,
        transient=output is Output.json,
    ) as lv:
        while True:
            summary = store.summary(rollout_id)
            lv.update(render(summary))
            if summary.rollout.state in FINISHED:
                break
            if not driver_alive(summary.rollout):
                fail(
                    f"the process driving rollout {rollout_id} is gone; "
                    f"run `jetfleet rollout resume {rollout_id}`",
                    EXIT_FAILED,
                )
            time.sleep(0.5)
    _finish(store, rollout_id, output)


def spawn_driver(s: ControllerSettings, rollout_id: str) -> int:
    """Continue the rollout in a detached process (it outlives this command)."""
    args = [
        sys.executable,
        "-c",
        "from controller.cli.main import app; app()",
        "--broker",
        s.broker,
        "--db",
        str(s.db_target()),
    ]
    if s.keys:
        args += ["--keys", str(s.keys)]
    if s.context:  # its protocol and prefix too, whatever the current context is then
        args += ["--context", s.context]
    for opt, val in (("--ca", s.ca), ("--cert", s.cert), ("--key", s.key)):
        if val:
            args += [opt, val]
    args += ["rollout", "resume", rollout_id, "--wait", "--output", "json"]
    log_dir = s.db.parent / "rollouts"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JETFLEET_LOG_LEVEL": os.environ.get("JETFLEET_LOG_LEVEL", "info")}
    with (log_dir / f"{rollout_id}.log").open("ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return proc.pid


def launch(
    s: ControllerSettings, keys: KeySet, rollout_id: str, wait: bool, output: Output
) -> None:
    if wait:
        drive(s, keys, rollout_id, output)
    pid = spawn_driver(s, rollout_id)
    store, _ = open_store(s)
    if output is Output.json:
        print_json({**store.summary(rollout_id).to_dict(), "driver_pid": pid})
    else:
        typer.echo(
            f"rollout {rollout_id} started (driver pid {pid}); "
            f"follow it with `jetfleet rollout status {rollout_id}`"
        )


def hand_to_driver(
    s: ControllerSettings, r: Rollout, wait: bool, output: Output, message: str
) -> None:
    """After a change to a stored rollout: its live driver acts on it (follow it with
    --wait, else say `message`); with none alive, start one."""
    if driver_alive(r):
        if wait:
            watch(s, r.id, output)
        typer.echo(message)
        return
    launch(s, keyset(s), r.id, wait, output)


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
) -> str:
    """Resolve the target against a fresh view of the fleet and store the planned rollout.

    Exits 2, storing nothing, for a never-seen device (unless `allow_unseen`), a rollback
    of a model a target device does not have, or a device another unfinished rollout
    still drives (unless `force`)."""
    store, registry = open_store(s)
    try:
        refresh_registry(s, registry, target=target)
    except MqttError as e:
        fail(f"{e}; the rollout was not started", EXIT_FAILED)
    try:
        ids = registry.resolve_target(target)
        unknown = registry.unknown(ids)
        if unknown and not allow_unseen:
            fail(never_seen_message(unknown, registry))
        if kind == "rollback":
            check_rollback_model(registry, ids, model)
        offline = [d.id for d in registry.devices() if d.id in set(ids) and not d.online]
        if offline:
            shown = ", ".join(offline[:10]) + (" …" if len(offline) > 10 else "")
            typer.echo(
                f"jetfleet: warning: {len(offline)} target device(s) offline ({shown}): "
                "their commands wait in the broker; they count as TIMED_OUT if they do not "
                f"finish within --wave-timeout {wave_timeout:g}s",
                err=True,
            )
        if unknown:
            typer.echo(
                f"jetfleet: warning: never seen {', '.join(unknown)}: their commands wait in "
                "the broker until they connect or the wave times out",
                err=True,
            )
        r = create_rollout(
            store,
            registry,
            kind=kind,
            model=model,
            version=version,
            device_ids=ids,
            waves_spec=waves,
            max_failure_rate=max_failure_rate,
            wave_timeout=wave_timeout,
            auto_rollback=auto_rollback,
            canary=canary,
            target=target,
            bundle_url=bundle[0] if bundle else None,
            bundle_sha256=bundle[1] if bundle else None,
            bundle_size=bundle[2] if bundle else None,
            payload=payload,
            force=force,
            policy=policy,
        )
    except DevicesHeldError as e:
        fail(str(e))
    except (TargetError, WaveSpecError) as e:
        fail(str(e))
    except ProtocolError as e:
        fail(e.reason)
    return r.id


def _names(ids: list[str], shown: int = 10) -> str:
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def never_seen_message(unknown: list[str], registry: Registry) -> str:
    known = [d.id for d in registry.devices()]
    return (
        f"--target names {len(unknown)} device(s) this controller has never seen: "
        f"{_names(unknown)} (known: {_names(known) or 'none'}); check the spelling "
        "(`jetfleet devices`), or pass --allow-unseen to command a device not yet connected"
    )


def check_rollback_model(registry: Registry, ids: list[str], model: str) -> None:
    """A rollback of a model a device does not hold is refused by that device anyway:
    refuse it here, before anything is signed, naming the models the fleet has."""
    records = {d.id: d for d in registry.devices()}
    lacking = [i for i in ids if i in records and model not in records[i].models]
    if not lacking:
        return
    fleet_models = sorted({m for i in ids if i in records for m in records[i].models})
    fail(
        f"rollback --model {model}: {len(lacking)} target device(s) have no model {model!r}: "
        f"{_names(lacking)} (their models: {', '.join(fleet_models) or 'none'})"
    )


def check_plan_options(waves: str, max_failure_rate: float, wave_timeout: float) -> None:
    from controller.rollout import parse_waves

    try:
        parse_waves(waves)
    except WaveSpecError as e:
        fail(str(e))
    if not 0 <= max_failure_rate <= 1:
        fail(f"--max-failure-rate {max_failure_rate:g} must be within 0..1")
    if wave_timeout <= 0:
        fail("--wave-timeout must be positive")


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
    output: Output = OutputOption,
) -> None:
    """Verify BUNDLE, publish it, and deploy it to the target in waves."""
    configure_cli_logging()
    s = settings(ctx)
    check_plan_options(waves, max_failure_rate, wave_timeout)
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
    )
    typer.echo(f"jetfleet: bundle URL {url}: {why}", err=True)
    if output is Output.human:
        typer.echo(f"rollout {rid}: {manifest.name} {manifest.version} from {url}", err=True)
    launch(s, keys, rid, wait, output)


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
            f"[{_STATE_STYLE.get(a.state, 'white')}]{a.state}[/]",
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
    summary = store.summary(r.id)
    driven = driver_alive(r)
    if output is Output.json:
        data = summary.to_dict()
        data["driver_alive"] = driven
        data["devices"] = [a.to_dict() for a in store.assignments(r.id)]
        print_json(data)
        return
    console = Console()
    console.print(render(summary))
    console.print(assignments_table(store.assignments(r.id)))
    if r.state not in FINISHED and not driven:
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
    sm = store.summary(r.id)
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
    _finish(store, r.id, output)
    raise AssertionError("unreachable")  # _finish always exits


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
        print_json(store.summary(r.id).to_dict())
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
    command for the same job)."""
    configure_cli_logging()
    s = settings(ctx)
    store, _ = open_store(s)
    r = find_rollout(store, rollout_id)
    if r.state in FINISHED:
        already_ended(store, r, output)
    if r.state == PAUSED:
        resume_state(store, r.id)
    hand_to_driver(s, r, wait, output, f"rollout {r.id} resumed; driven by process {r.driver_pid}")


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
    hand_to_driver(
        s, r, wait, output, f"rollout {r.id} aborting; process {r.driver_pid} is finishing it"
    )


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
    hand_to_driver(
        s, r, wait, output, f"rollout {r.id} promoted; process {r.driver_pid} starts the next wave"
    )


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
    )
    if output is Output.human:
        typer.echo(f"rollout {rid}: retry of {old.id} on {len(failed)} device(s)", err=True)
    launch(s, keys, rid, wait, output)
