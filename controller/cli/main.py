"""`jetfleet`: global options, then one sub-command group per module of this package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from controller.cli.common import EXIT_USAGE
from controller.settings import ControllerSettings, SettingsError

# The options of `_global` below: accepted anywhere on the line, as kubectl does.
GLOBAL_OPTIONS = frozenset(
    ("--context", "--broker", "--keys", "--db", "--ca", "--cert", "--key", "--config")
)


def _leaf(group: TyperGroup, ctx: Any, args: list[str]) -> tuple[Any, int]:
    """The sub-command the line names, and the index of the first argument after it."""
    cmd: Any = group
    i = 0
    while i < len(args) and isinstance(cmd, TyperGroup):
        token = args[i]
        if token in GLOBAL_OPTIONS and cmd is group:
            i += 2
            continue
        if token.startswith("-"):
            i += 1
            continue
        sub = cmd.get_command(ctx, token)
        if sub is None:
            break
        cmd, i = sub, i + 1
    return cmd, i


def hoist_global_options(group: TyperGroup, ctx: Any, args: list[str]) -> list[str]:
    """Move global options written after the sub-command in front of it, unless that
    sub-command has an option of the same name (then it is the sub-command's)."""
    leaf, start = _leaf(group, ctx, args)
    if leaf is group:
        return args
    own = {o for p in leaf.params for o in (*p.opts, *p.secondary_opts)}
    hoisted: list[str] = []
    rest: list[str] = []
    i = start
    while i < len(args):
        token = args[i]
        if token == "--":
            rest += args[i:]
            break
        name = token.split("=", 1)[0]
        if name in GLOBAL_OPTIONS and name not in own:
            take = 1 if "=" in token else 2
            hoisted += args[i : i + take]
            i += take
            continue
        rest.append(token)
        i += 1
    return hoisted + args[:start] + rest


class GlobalOptionsAnywhere(TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # a click Context
        return super().parse_args(ctx, hoist_global_options(self, ctx, args))


app = typer.Typer(
    name="jetfleet",
    cls=GlobalOptionsAnywhere,
    help="Build, sign and roll out ML models to a fleet of Jetson robots.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _global(
    ctx: typer.Context,
    context: str | None = typer.Option(
        None, help="named context of the config file [env JETFLEET_CONTEXT; `context use`]"
    ),
    broker: str | None = typer.Option(None, help="MQTT broker URL [env JETFLEET_BROKER]"),
    keys: Path | None = typer.Option(
        None, help="key directory from `jetfleet keys init` [env JETFLEET_KEYS]"
    ),
    db: Path | None = typer.Option(None, help="controller SQLite database [env JETFLEET_DB]"),
    ca: str | None = typer.Option(None, help="CA certificate for mqtts://"),
    cert: str | None = typer.Option(None, help="client certificate for mutual TLS"),
    key: str | None = typer.Option(None, help="client key for mutual TLS"),
    config: Path | None = typer.Option(
        None, help="config file [default ~/.config/jetfleet/config.toml]"
    ),
) -> None:
    try:
        ctx.obj = ControllerSettings.load(
            {"broker": broker, "keys": keys, "db": db, "ca": ca, "cert": cert, "key": key},
            config=config,
            context=context,
        )
    except SettingsError as e:
        if ctx.invoked_subcommand == "context":  # how one gets out of a bad context
            return
        typer.echo(f"jetfleet: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from e


# Command groups register themselves here, one line each.
from controller.cli import pki as _pki  # noqa: E402

app.add_typer(_pki.app, name="pki")
from controller.cli import context as _context  # noqa: E402

app.add_typer(_context.app, name="context")
from controller.cli import broker as _broker  # noqa: E402

app.add_typer(_broker.app, name="broker")
from controller.cli import devices as _devices  # noqa: E402

app.command("devices")(_devices.devices)
from controller.cli import device as _device  # noqa: E402

app.add_typer(_device.app, name="device")
from controller.cli import rollout as _rollout  # noqa: E402

app.add_typer(_rollout.app, name="rollout")
from controller.cli import rollback as _rollback  # noqa: E402

app.command("rollback")(_rollback.rollback)
from controller.cli import keys as _keys  # noqa: E402

app.add_typer(_keys.app, name="keys")
from controller.cli import bundle as _bundle  # noqa: E402

app.add_typer(_bundle.app, name="bundle")
from controller.cli import release as _release  # noqa: E402

app.add_typer(_release.app, name="release")
from controller.sandbox.demo import demo_command  # noqa: E402

app.command("demo")(demo_command)
from controller.cli import telemetry as _telemetry  # noqa: E402

app.add_typer(_telemetry.app, name="telemetry")
from controller.cli import serve as _serve  # noqa: E402

app.command("serve")(_serve.serve)
