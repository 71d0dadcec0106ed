"""`jetfleet context list|use NAME`: named contexts, one per fleet (as kubectl's).

A context is a `[contexts.NAME]` table of the config file (broker, keys, db, ...); its
database and bundle directory default to DATA_DIR/contexts/NAME/ (see settings.py)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from controller.cli.common import Output, OutputOption, fail, print_json
from controller.db import describe
from controller.settings import (
    ControllerSettings,
    SettingsError,
    config_path,
    context_values,
    contexts,
    current_context,
    current_context_path,
    read_config,
)
from protocol.fsio import write_atomic

app = typer.Typer(help="Named contexts: broker, keys and state per fleet.", no_args_is_help=True)


def _config(ctx: typer.Context) -> Path:
    return config_path(ctx.find_root().params.get("config"))


@app.command("list")
def list_(ctx: typer.Context, output: Output = OutputOption) -> None:
    """The contexts of the config file; the one in use is marked."""
    path = _config(ctx)
    current = (
        ctx.find_root().params.get("context")
        or os.environ.get("JETFLEET_CONTEXT")
        or current_context(path)
    )
    rows: list[dict[str, str]] = []
    for name in sorted(contexts(read_config(path))):
        try:
            s = ControllerSettings.load(config=path, context=name)
        except SettingsError as e:
            fail(str(e))
        rows.append(
            {
                "name": name,
                "current": "*" if name == current else "",
                "broker": s.broker,
                "keys": str(s.keys or ""),
                "db": describe(s.db_target()),
            }
        )
    if output is Output.json:
        print_json([{**r, "current": r["current"] == "*"} for r in rows])
        return
    if not rows:
        typer.echo(f"no contexts in {path}: add [contexts.NAME] tables (docs/operations.md)")
        return
    table = Table(title=f"contexts ({path})", title_justify="left")
    for col in ("", "name", "broker", "keys", "db"):
        table.add_column(col, no_wrap=col == "name")
    for r in rows:
        table.add_row(r["current"], r["name"], r["broker"], r["keys"], r["db"])
    Console().print(table)


@app.command("use")
def use(ctx: typer.Context, name: str = typer.Argument(..., help="context name")) -> None:
    """Make NAME the context every later command uses (until `--context` says otherwise)."""
    path = _config(ctx)
    try:
        context_values(read_config(path), name, path)
    except SettingsError as e:
        fail(str(e))
    target = current_context_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, f"{name}\n".encode(), 0o644)
    typer.echo(f"using context {name!r} (written to {target})")
