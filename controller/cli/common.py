"""What every `jetfleet` command shares: exit codes (SPEC §7), errors, output format."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any, NoReturn

import typer

from controller.settings import ControllerSettings

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
    """One clear line on stderr, then exit with the SPEC's code."""
    typer.echo(f"jetfleet: {message}", err=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def settings(ctx: typer.Context) -> ControllerSettings:
    """The settings resolved by the global options (see main.py)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, ControllerSettings):  # a sub-app invoked on its own in tests
        obj = ControllerSettings.load()
    return obj
