"""`jetfleet broker config`: a Mosquitto 2 configuration with mutual TLS and per-device ACLs;
`jetfleet broker run`: a local development broker."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from controller.cli.common import EXIT_FAILED, Output, OutputOption, fail, print_json
from controller.sandbox.localbroker import BrokerError, LocalMosquitto
from controller.security import brokerconfig, pki
from controller.settings import default_data_dir
from protocol.topics import DEFAULT_PREFIX

app = typer.Typer(help="Broker configuration for the fleet (Mosquitto 2).", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Broker configuration for the fleet (Mosquitto 2; docs/brokers.md for EMQX, HiveMQ)."""


@app.command("config")
def config(
    out: Path = typer.Option(..., "--out", help="directory for mosquitto.conf, acl, certs/"),
    pki_dir: Path = typer.Option(Path("pki"), "--pki", help="PKI directory (`jetfleet pki`)"),
    port: int = typer.Option(brokerconfig.DEFAULT_PORT, "--port", help="TLS listener port"),
    bind: str = typer.Option("", "--bind", help="listen address [default: all interfaces]"),
    prefix: str = typer.Option(DEFAULT_PREFIX, "--prefix", help="topic prefix"),
    controller_name: list[str] = typer.Option(
        [pki.DEFAULT_CONTROLLER],
        "--controller-name",
        help="controller identity (certificate CN) with rights on the whole tree; repeatable",
    ),
    groups_file: Path | None = typer.Option(
        None, "--groups-file", help="devices.toml: [devices] id = [groups] (for group commands)"
    ),
    server_name: str = typer.Option(
        pki.DEFAULT_SERVER, "--server-name", help="name given to `pki issue-server --name`"
    ),
    install_dir: Path | None = typer.Option(
        None, "--install-dir", help="where OUT will live on the broker host [default: OUT]"
    ),
    data_dir: Path = typer.Option(
        Path("/var/lib/mosquitto"), "--data-dir", help="Mosquitto persistence directory"
    ),
    run_as: str | None = typer.Option(
        None, "--run-as", help="user Mosquitto switches to when started as root"
    ),
    controller_port: int | None = typer.Option(
        None,
        "--controller-port",
        help="a separate listener for controllers; the devices' listener then pins each "
        "client id to its certificate name (no session takeover between devices)",
    ),
    controller_bind: str = typer.Option(
        "", "--controller-bind", help="address of the controllers' listener (ops network)"
    ),
    log_denials: bool = typer.Option(
        False, "--log-denials", help="log every ACL denial (Mosquitto debug log level)"
    ),
    output: Output = OutputOption,
) -> None:
    """Write a Mosquitto 2 config requiring fleet-CA client certificates, and its ACL."""
    try:
        files = brokerconfig.write_broker_config(
            out,
            pki_dir,
            port=port,
            bind=bind,
            prefix=prefix,
            controllers=controller_name,
            groups_file=groups_file,
            server_name=server_name,
            install_dir=install_dir,
            data_dir=data_dir,
            run_as=run_as,
            log_denials=log_denials,
            controller_port=controller_port,
            controller_bind=controller_bind,
        )
    except (brokerconfig.BrokerConfigError, pki.PkiError) as e:
        fail(str(e))
    unissued = [c for c in controller_name if pki.role_of(pki_dir, c) is None]
    if output is Output.json:
        print_json({**files.as_dict(), "unissued_controllers": unissued})
        return
    typer.echo(f"wrote {files.config}, {files.acl}, {files.rabbitmq} and {files.cert.parent}/")
    typer.echo(f"  {files.devices_with_groups} device(s) with group command topics")
    for c in unissued:
        typer.echo(f"  note: no certificate issued yet for controller {c!r} "
                   f"(jetfleet pki issue-controller --name {c})")  # fmt: skip
    if controller_port is None:
        typer.echo("  note: one listener: a robot can take over another robot's session by "
                   "its client id; for production add --controller-port and "
                   "--controller-bind (docs/brokers.md §2)", err=True)  # fmt: skip
    elif not controller_bind:
        typer.echo(f"  warning: the controllers' port {controller_port} listens on every "
                   "interface: it protects nothing unless robots cannot reach it "
                   "(--controller-bind or a firewall)", err=True)  # fmt: skip
    typer.echo(f"start it with: mosquitto -c {files.config}")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@app.command("run")
def run(
    port: int = typer.Option(1883, "--port", help="port on 127.0.0.1"),
    directory: Path | None = typer.Option(
        None, "--dir", help="config, log and persistence [default: DATA_DIR/broker]"
    ),
) -> None:
    """A local Mosquitto for the tour and for development, in the foreground until
    Ctrl-C: loopback only, no TLS, anonymous. For a fleet use `broker config`."""
    work = directory or default_data_dir() / "broker"
    broker = LocalMosquitto(work, port=port)
    try:
        broker.start()
    except BrokerError as e:
        fail(f"{e} (is port {port} taken? try --port)", EXIT_FAILED)
    typer.echo(
        f"broker listening on {broker.url} (development only: loopback, no TLS, anonymous); "
        f"use it with: export JETFLEET_BROKER={broker.url}",
        err=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C (never inside wait())
    try:
        broker.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
