"""`jetfleet keys`: the signing keys (root, release, operator) and the trust root."""

from __future__ import annotations

from pathlib import Path

import typer

from controller import keystore
from controller.cli.common import Output, OutputOption, fail, print_json, settings
from protocol.trust import ROLES, RoleName

app = typer.Typer(
    help="Signing keys and the trust root devices are provisioned with.",
    no_args_is_help=True,
)

DirArgument = typer.Argument(
    None, help="key directory (default: the global --keys or JETFLEET_KEYS)"
)
DaysOption = typer.Option(
    keystore.DEFAULT_EXPIRES_DAYS, "--expires-days", min=1, help="trust root validity in days"
)


def _directory(ctx: typer.Context, directory: Path | None) -> Path:
    chosen = directory or settings(ctx).keys
    if chosen is None:
        fail("no key directory: give DIR, --keys DIR or set JETFLEET_KEYS")
    return chosen


def _report(title: str, directory: Path, keys: keystore.KeySet, output: Output) -> None:
    trust = keys.trust
    if output is Output.json:
        print_json(
            {
                "directory": str(directory),
                "trust_root": str(directory / keystore.TRUST_FILE),
                "version": trust.version,
                "expires": trust.expires.isoformat(),
                "keyids": {role: keys.key(role).keyid for role in ROLES},
            }
        )
        return
    # Plain lines, not a table: key ids are copied whole into configs and ACLs.
    typer.echo(f"{title} {directory}")
    for role in ROLES:
        typer.echo(f"  {role:<9} {keys.key(role).keyid}  {keystore.KEY_FILES[role]} (0600)")
    typer.echo(
        f"trust root {directory / keystore.TRUST_FILE}: version {trust.version}, "
        f"expires {trust.expires:%Y-%m-%d %H:%M} UTC"
    )


@app.command("init")
def init(
    ctx: typer.Context,
    directory: Path | None = DirArgument,
    force: bool = typer.Option(False, "--force", help="replace existing keys"),
    expires_days: int = DaysOption,
    output: Output = OutputOption,
) -> None:
    """Create root, release and operator keys and DIR/trust.json, signed by the root key.

    Install trust.json on every device (agent.toml `trust_root`); keep root.key offline.
    """
    d = _directory(ctx, directory)
    try:
        keys = keystore.init_keys(d, force=force, expires_days=expires_days)
    except keystore.KeystoreError as e:
        fail(str(e))
    _report("created keys in", d, keys, output)


@app.command("rotate")
def rotate(
    ctx: typer.Context,
    directory: Path | None = DirArgument,
    role: list[str] = typer.Option(
        ["release", "operator"],
        "--role",
        help="role whose key is replaced (repeat; root too for a root rotation)",
    ),
    expires_days: int = DaysOption,
    output: Output = OutputOption,
) -> None:
    """Issue the next trust root version with new keys for the given roles.

    It is signed by the old and the new root key, so devices holding the current trust
    root accept it (send it to them as a trust_update command). Old keys are kept in
    DIR/retired/v<N>/.
    """
    d = _directory(ctx, directory)
    bad = [r for r in role if r not in ROLES]
    if bad:
        fail(f"unknown role {bad[0]!r}: roles are {', '.join(ROLES)}")
    roles: list[RoleName] = [r for r in ROLES if r in role]
    try:
        keys = keystore.rotate_keys(d, roles=roles, expires_days=expires_days)
    except keystore.KeystoreError as e:
        fail(str(e))
    _report(f"rotated {', '.join(roles)} in", d, keys, output)


@app.command("show")
def show(
    ctx: typer.Context,
    directory: Path | None = DirArgument,
    output: Output = OutputOption,
) -> None:
    """Show the key ids and the trust root of a key directory (checks that they match)."""
    d = _directory(ctx, directory)
    try:
        keys = keystore.load_keys(d, check_expiry=False)
    except keystore.KeystoreError as e:
        fail(str(e))
    _report("keys in", d, keys, output)
