"""`jetfleet rollback --model N --to-version V --target ...`: a rollout of rollback commands.

The same waves, failure threshold and persistence as `rollout start`; each device is told,
with an operator-signed command, to make version V of model N active again (the one
signed instruction a device accepts a downgrade from)."""

from __future__ import annotations

import typer

from controller.cli.common import (
    AllowUnseenOption,
    CanaryOption,
    ForceOption,
    MaxFailOption,
    Output,
    OutputOption,
    TargetOption,
    WaitOption,
    WaveTimeoutOption,
    check_plan_options,
    configure_cli_logging,
    fail,
    keyset,
    launch,
    settings,
    start_rollout,
)
from protocol.errors import ProtocolError
from protocol.ids import validate_id, validate_semver


def rollback(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", help="model name"),
    to_version: str = typer.Option(..., "--to-version", help="version to make active again"),
    target: str = TargetOption,
    waves: str = typer.Option("100%", "--waves", help="cumulative wave sizes: counts or %"),
    max_failure_rate: float = MaxFailOption,
    wave_timeout: float = WaveTimeoutOption,
    wait: bool = WaitOption,
    canary: str | None = CanaryOption,
    force: bool = ForceOption,
    allow_unseen: bool = AllowUnseenOption,
    output: Output = OutputOption,
) -> None:
    """Return devices to an earlier version of a model, in waves."""
    configure_cli_logging()
    s = settings(ctx)
    try:
        validate_id(model, "model name")
        validate_semver(to_version)
    except ProtocolError as e:
        fail(e.reason)
    check_plan_options(waves, max_failure_rate, wave_timeout)
    keys = keyset(s)
    rid = start_rollout(
        s,
        kind="rollback",
        keys=keys,
        model=model,
        version=to_version,
        target=target,
        waves=waves,
        max_failure_rate=max_failure_rate,
        wave_timeout=wave_timeout,
        auto_rollback=False,
        canary=canary,
        force=force,
        allow_unseen=allow_unseen,
    )
    if output is Output.human:
        typer.echo(f"rollout {rid}: rollback of {model} to {to_version}", err=True)
    launch(s, keys, rid, wait, output)
