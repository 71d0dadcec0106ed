"""`jetfleet serve`: telemetry ingestion, bundle hosting and the Prometheus endpoint."""

from __future__ import annotations

import logging
import os
import sys

import structlog
import typer

from controller.cli.common import EXIT_FAILED, fail, require_extra, settings
from controller.security.keystore import KeystoreError, load_keys
from controller.server.serve import (
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    ConsoleTokenError,
    JetfleetServer,
    ServeConfig,
)
from controller.server.state import ServeState
from controller.settings import ControllerSettings
from controller.telemetry.store import RAW_RETENTION_S, TelemetryStoreError, default_telemetry_db
from protocol.errors import ProtocolError
from protocol.ids import validate_id


def _daemon_logging() -> None:
    level = os.environ.get("JETFLEET_LOG_LEVEL", "info").upper()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _operator(s: ControllerSettings) -> ControllerSettings | None:
    """The settings, when they hold a loadable operator key: the console's actions then
    sign through the same driver as `jetfleet rollout` (without it they are off)."""
    if s.keys is None:
        return None
    try:
        load_keys(s.keys)
    except KeystoreError:
        return None
    return s


def serve(
    ctx: typer.Context,
    http_port: int = typer.Option(8380, "--http-port", help="bundles (and /metrics) port"),
    metrics_port: int | None = typer.Option(
        None, "--metrics-port", help="also serve /metrics on this port"
    ),
    host: str = typer.Option("0.0.0.0", "--host", help="address to listen on"),
    advertise_host: str | None = typer.Option(
        None, "--advertise-host", help="host name devices use to reach this server [hostname]"
    ),
    share_group: str = typer.Option(
        "jetfleet", "--share-group", help="MQTT 5 shared-subscription group of the ingesters"
    ),
    telemetry_db: str | None = typer.Option(
        None,
        "--telemetry-db",
        help="telemetry database: a file or postgresql://… [default: telemetry.db next to a "
        "SQLite --db; PostgreSQL: the --db database]",
    ),
    no_ingest: bool = typer.Option(False, "--no-ingest", help="host bundles and metrics only"),
    ingest_workers: int = typer.Option(
        1,
        "--ingest-workers",
        min=1,
        help="ingester processes sharing the MQTT 5 subscription (one per spare core)",
    ),
    raw_retention: float = typer.Option(
        RAW_RETENTION_S / 3600,
        "--raw-retention",
        min=1,
        help="hours raw samples are kept before only their minute means remain "
        "(~730 B per sample: 10,000 robots at 1/s fill ~26 GB an hour)",
    ),
    idle_timeout: float = typer.Option(
        IDLE_TIMEOUT_S,
        "--idle-timeout",
        min=0.1,
        help="seconds an HTTP client may stay silent (mid-request or between requests)",
    ),
    max_connections: int = typer.Option(
        MAX_CONNECTIONS,
        "--max-connections",
        min=1,
        help="HTTP connections open at once; more get 503 + Retry-After",
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        help="the console's token (needed to listen beyond loopback, and for actions) "
        "[JETFLEET_CONSOLE_TOKEN, else console_token in the config file]",
    ),
    no_console: bool = typer.Option(
        False, "--no-console", help="no web console: bundles and /metrics only"
    ),
) -> None:
    """Run telemetry ingestion, bundle hosting over HTTP and the Prometheus endpoint."""
    require_extra("prometheus_client", "serve")
    _daemon_logging()
    s = settings(ctx)
    try:
        validate_id(share_group, "share group")
    except ProtocolError as e:
        fail(e.reason)
    cfg = ServeConfig(
        broker=s.broker,
        telemetry_db=telemetry_db or default_telemetry_db(s.db_target()),
        bundle_dir=s.bundle_dir,
        data_dir=s.db.parent,
        controller_db=s.db_target(),
        host=host,
        http_port=http_port,
        metrics_port=metrics_port,
        advertise_host=advertise_host,
        protocol=s.protocol,
        share_group=share_group,
        prefix=s.prefix,
        ca=s.ca,
        cert=s.cert,
        key=s.key,
        ingest=not no_ingest,
        ingest_workers=ingest_workers,
        raw_retention_s=raw_retention * 3600,
        idle_timeout_s=idle_timeout,
        max_connections=max_connections,
        console=not no_console,
        token=token or s.console_token or None,
        actions=_operator(s),
    )

    def ready(state: ServeState) -> None:
        typer.echo(f"bundles: {state.bundle_url_base}/  metrics: {state.metrics_url}", err=True)
        if cfg.console:
            console = state.bundle_url_base.removesuffix("/bundles") + "/"
            typer.echo(f"console: {console}", err=True)

    try:
        JetfleetServer(cfg).run_forever(ready)
    except (ProtocolError, ConsoleTokenError) as e:  # TLS files, broker URL, no token
        fail(e.reason)
    except TelemetryStoreError as e:
        fail(str(e), EXIT_FAILED)
    except ValueError as e:  # e.g. several workers on MQTT 3.1.1
        fail(str(e))
    except (OSError, ConnectionError) as e:
        fail(f"cannot start: {e}", EXIT_FAILED)
