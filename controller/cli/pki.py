"""`jetfleet pki`: the fleet CA and the TLS certificates of devices, controllers, brokers."""

from __future__ import annotations

from pathlib import Path

import typer
from cryptography.x509.oid import NameOID

from controller.cli.common import EXIT_VERIFY, Output, OutputOption, fail, print_json
from controller.security import pki

app = typer.Typer(
    help="Fleet TLS PKI: a CA and mutual-TLS certificates for devices, controllers, brokers.",
    no_args_is_help=True,
)

PkiOption = typer.Option(Path("pki"), "--pki", help="PKI directory made by `jetfleet pki init`")
OutOption = typer.Option(
    None, "--out", help="where to write NAME.crt, NAME.key, ca.crt [default: PKI/<role>s/]"
)
DaysOption = typer.Option(pki.LEAF_DAYS, "--days", min=1, help="validity in days")


def _report(issued: pki.IssuedCert, output: Output) -> None:
    if output is Output.json:
        print_json(issued.as_dict())
        return
    typer.echo(f"issued {issued.role.value} certificate for {issued.common_name!r}")
    typer.echo(f"  cert  {issued.cert}")
    typer.echo(f"  key   {issued.key}  (mode 0600)")
    typer.echo(f"  ca    {issued.ca}")
    typer.echo(f"  valid until {issued.not_after:%Y-%m-%d %H:%M} UTC")


@app.command("init")
def init(
    directory: Path = typer.Argument(..., help="directory for ca.crt and ca.key (0600)"),
    name: str = typer.Option(pki.DEFAULT_CA_NAME, help="the CA's common name"),
    days: int = typer.Option(pki.CA_DAYS, "--days", min=1, help="CA validity in days"),
    force: bool = typer.Option(False, "--force", help="replace an existing CA"),
    output: Output = OutputOption,
) -> None:
    """Create the fleet CA (ECDSA P-256, SHA-256): keep ca.key offline once devices are issued."""
    try:
        ca = pki.init_ca(directory, name=name, days=days, force=force)
    except pki.PkiError as e:
        fail(str(e))
    if output is Output.json:
        print_json({"ca": str(ca.cert_path), "not_after": ca.not_after.isoformat()})
    else:
        typer.echo(f"created fleet CA {ca.cert_path} (key {directory / pki.CA_KEY}, mode 0600)")
        typer.echo(f"  valid until {ca.not_after:%Y-%m-%d} UTC")


@app.command("issue")
def issue(
    device_id: str = typer.Argument(..., help="device id: the certificate's common name"),
    pki_dir: Path = PkiOption,
    out: Path | None = OutOption,
    days: int = DaysOption,
    output: Output = OutputOption,
) -> None:
    """Issue a device's client certificate (CN = device id, clientAuth) for mutual TLS."""
    try:
        issued = pki.issue_device(pki_dir, device_id, out_dir=out, days=days)
    except pki.PkiError as e:
        fail(str(e))
    _report(issued, output)


@app.command("issue-controller")
def issue_controller(
    name: str = typer.Option(pki.DEFAULT_CONTROLLER, "--name", help="controller identity"),
    pki_dir: Path = PkiOption,
    out: Path | None = OutOption,
    days: int = DaysOption,
    output: Output = OutputOption,
) -> None:
    """Issue the controller's client certificate (the broker ACL gives it the whole tree)."""
    try:
        issued = pki.issue_controller(pki_dir, name, out_dir=out, days=days)
    except pki.PkiError as e:
        fail(str(e))
    _report(issued, output)


@app.command("issue-server")
def issue_server(
    host: list[str] = typer.Option(
        ..., "--host", help="DNS name or IP clients use in the broker URL (repeatable)"
    ),
    name: str = typer.Option(pki.DEFAULT_SERVER, "--name", help="certificate name"),
    pki_dir: Path = PkiOption,
    out: Path | None = OutOption,
    days: int = DaysOption,
    output: Output = OutputOption,
) -> None:
    """Issue the broker's server certificate (serverAuth, SAN = every --host)."""
    try:
        issued = pki.issue_server(pki_dir, host, name=name, out_dir=out, days=days)
    except pki.PkiError as e:
        fail(str(e))
    _report(issued, output)


@app.command("revoke")
def revoke(
    name: str = typer.Argument(..., help="device id (or controller name) to cut off"),
    pki_dir: Path = PkiOption,
    output: Output = OutputOption,
) -> None:
    """Revoke every certificate issued to NAME and rewrite PKI/crl.pem (a stolen robot)."""
    try:
        r = pki.revoke(pki_dir, name)
    except pki.PkiError as e:
        fail(str(e))
    if output is Output.json:
        print_json({"common_name": name, "serials": [f"{s:x}" for s in r.serials],
                    "crl": str(r.crl)})  # fmt: skip
        return
    typer.echo(f"revoked {len(r.serials)} certificate(s) of {name!r}; CRL {r.crl}")
    typer.echo(
        f"  {name!r} can still connect: the broker checks its own copy of the CRL. Regenerate "
        "the broker config (`jetfleet broker config`, which copies the new CRL) and restart "
        "the broker; only then is it cut off."
    )


@app.command("verify")
def verify(
    cert: Path = typer.Argument(..., help="a certificate to check against the fleet CA"),
    pki_dir: Path = PkiOption,
    output: Output = OutputOption,
) -> None:
    """Check that CERT was issued by this PKI's CA and is valid now (exit 3 if not)."""
    try:
        c = pki.verify_issued(pki_dir, cert)
    except pki.PkiError as e:
        fail(str(e), EXIT_VERIFY)
    cn = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    info = {
        "cert": str(cert),
        "common_name": str(cn[0].value) if cn else "",
        "not_after": c.not_valid_after_utc.isoformat(),
        "serial": f"{c.serial_number:x}",
    }
    if output is Output.json:
        print_json(info)
    else:
        typer.echo(f"{cert}: issued by the fleet CA to {info['common_name']!r}, valid until "
                   f"{c.not_valid_after_utc:%Y-%m-%d} UTC")  # fmt: skip
