"""`jetfleet keys`: the signing keys (root, release, operator) and the trust root."""

from __future__ import annotations

from pathlib import Path

import typer

from controller.cli.common import (
    EXIT_VERIFY,
    AllowUnseenOption,
    Output,
    OutputOption,
    check_plan_options,
    configure_cli_logging,
    fail,
    keyset,
    launch,
    print_json,
    settings,
    start_rollout,
)
from controller.fleet.access import open_store
from controller.rollouts.driver import TRUST_ROOT_MODEL, trust_update_payload
from controller.security import keystore
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
    root accept it: send it to them with `jetfleet keys push`. Old keys are kept in
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
    if output is Output.human:
        typer.echo(f"send it to the fleet: jetfleet --keys {d} keys push --target all --wait")


@app.command("push")
def push(
    ctx: typer.Context,
    target: str = typer.Option(..., "--target", help="group:NAME, ID[,ID...] or all"),
    wait: bool = typer.Option(
        False, "--wait", help="show live progress; exit 1 if a device refuses it"
    ),
    wave_timeout: float = typer.Option(
        900.0, "--wave-timeout", help="seconds devices have to answer (offline ones time out)"
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="DANGEROUS: push even though another running or paused rollout still drives "
        "some target devices",
    ),
    allow_unseen: bool = AllowUnseenOption,
    output: Output = OutputOption,
) -> None:
    """Send the trust root of the global --keys directory (its trust.json) to devices.

    One signed trust_update command per device, run as a rollout of one wave (listed by
    `jetfleet rollout list`, resumable with `jetfleet rollout resume`). It is signed with
    the current operator key and the retired ones, because a device checks it against
    the trust root it still holds. Each device answers SUCCEEDED, or REJECTED with the
    reason (e.g. a trust root not signed by the root keys it trusts); --wait exits 1 if
    any device did not take it.
    """
    configure_cli_logging()
    s = settings(ctx)
    check_plan_options("100%", 0.0, wave_timeout)
    keys = keyset(s)
    assert s.keys is not None  # keyset() fails without a key directory
    try:
        signers = keystore.trust_update_signers(s.keys, keys)
    except keystore.KeystoreError as e:
        fail(str(e), EXIT_VERIFY)
    rid = start_rollout(
        s,
        kind="trust_update",
        keys=keys,
        model=TRUST_ROOT_MODEL,
        version=str(keys.trust.version),
        target=target,
        waves="100%",
        # Every device's answer is its own: a refusal does not stop the others (one
        # wave), and it makes the push end as failed (exit 1) with the reasons.
        max_failure_rate=0.0,
        wave_timeout=wave_timeout,
        auto_rollback=False,
        canary=None,
        payload=trust_update_payload(keys.trust_envelope, keystore.trust_chain(s.keys, keys)),
        force=force,
        allow_unseen=allow_unseen,
    )
    if output is Output.human:
        typer.echo(
            f"rollout {rid}: trust root version {keys.trust.version} to {target}, signed by "
            f"{len(signers)} operator key(s) (current + retired)",
            err=True,
        )
        store, _ = open_store(s)
        current = [a.device_id for a in store.assignments(rid) if a.terminal and not a.command_id]
        if current:
            shown = ", ".join(current[:10]) + (" …" if len(current) > 10 else "")
            typer.echo(
                f"{len(current)} device(s) already up to date (their status reports version "
                f"{keys.trust.version} or newer; nothing sent): {shown}",
                err=True,
            )
    launch(s, keys, rid, wait, output)


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
